"""KServe v2 tensors <-> Tandem requests: the model's inputs and outputs as Triton sees them.

The model looks like Triton's vLLM backend model: inputs `text_input` (BYTES), optional
`stream` (BOOL) and `sampling_parameters` (BYTES holding a JSON object); outputs
`text_output` and `finish_reason` (BYTES), each one element (no batching).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from proto.kserve import grpc_service_pb2 as pb
from router.requests import (
    SAMPLING_FIELDS,
    BadRequest,
    GenerateRequest,
    PromptEncoder,
    UnknownModel,
    brief,
    check_model,
    make_request,
)

MODEL_VERSION = "1"  # the one version served; "" also selects it, as in Triton
PLATFORM = "tandem"
INPUTS = {"text_input": "BYTES", "stream": "BOOL", "sampling_parameters": "BYTES"}
OUTPUTS = {"text_output": "BYTES", "finish_reason": "BYTES"}
CONFIG_TYPES = {"BYTES": pb.TYPE_STRING, "BOOL": pb.TYPE_BOOL}
FINAL_RESPONSE = "triton_final_response"  # marks a decoupled request's last response


@dataclass(frozen=True)
class KServeRequest:
    generate: GenerateRequest
    stream: bool  # one response per delta (decoupled) instead of one for the whole text
    client_id: str  # ModelInferRequest.id, echoed in every response
    outputs: tuple[str, ...]  # outputs to return, in order: those requested, else all


def check_model_version(backend, name: str, version: str) -> None:
    check_model(backend, name, "model_name")
    if version not in ("", MODEL_VERSION):
        raise UnknownModel(
            f"model {brief(name)} has no version {brief(version)}; the served version is {MODEL_VERSION!r}",
            "model_version",
        )


def _deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadRequest(f"input {name!r}: truncated BYTES element length", name)
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise BadRequest(f"input {name!r}: BYTES element runs past the end of the data", name)
        elements.append(raw[at : at + size])
        at += size
    return elements


def serialize_bytes(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _elements(tensor, raw: bytes | None) -> list:
    name = tensor.name
    if raw is not None:
        return _deserialize_bytes(raw, name) if tensor.datatype == "BYTES" else [b != 0 for b in raw]
    contents = tensor.contents
    return list(contents.bytes_contents if tensor.datatype == "BYTES" else contents.bool_contents)


def _input_values(msg: pb.ModelInferRequest) -> dict:
    if msg.raw_input_contents and len(msg.raw_input_contents) != len(msg.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(msg.raw_input_contents)} entries for "
            f"{len(msg.inputs)} inputs; it must have one per input",
            "raw_input_contents",
        )
    values = {}
    for i, tensor in enumerate(msg.inputs):
        name = tensor.name
        if name not in INPUTS:
            raise BadRequest(f"unexpected input {brief(name)}; inputs are {', '.join(INPUTS)}", name)
        if name in values:
            raise BadRequest(f"input {name!r} is given twice", name)
        if tensor.datatype != INPUTS[name]:
            raise BadRequest(f"input {name!r} must have datatype {INPUTS[name]}, got {brief(tensor.datatype)}", name)
        if any(d < 1 for d in tensor.shape) or math.prod(tensor.shape) != 1:
            raise BadRequest(
                f"input {name!r} must have a shape of one element, [1] (batching is not "
                f"supported), got {brief(list(tensor.shape))}",
                name,
            )
        elements = _elements(tensor, msg.raw_input_contents[i] if msg.raw_input_contents else None)
        if len(elements) != 1:
            raise BadRequest(
                f"input {name!r} must hold exactly one element (batching is not supported), "
                f"got {len(elements)} with shape {list(tensor.shape)}",
                name,
            )
        values[name] = elements[0]
    if "text_input" not in values:
        raise BadRequest("input 'text_input' is missing", "text_input")
    return values


def _coerce(name: str, value):
    """vLLM's Triton backend takes sampling values as JSON strings too ("0.7", "true")."""
    kind = SAMPLING_FIELDS.get(name)
    if not isinstance(value, str) or kind not in ("number", "integer", "boolean"):
        return value
    try:
        if kind == "number":
            return float(value)
        if kind == "integer":
            return int(value)
    except ValueError:
        return value  # left for the type check, which names the field
    return {"true": True, "false": False}.get(value.lower(), value)


def _sampling_fields(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    param = "sampling_parameters"
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"{param} is not valid JSON: {exc}", param) from None
    except RecursionError:
        raise BadRequest(f"{param} is nested too deeply to be a JSON object of sampling fields", param) from None
    if not isinstance(fields, dict):
        raise BadRequest(f"{param} must be a JSON object, got {type(fields).__name__}", param)
    return {name: _coerce(name, value) for name, value in fields.items()}


async def parse_infer_request(backend, encoder: PromptEncoder, msg: pb.ModelInferRequest) -> KServeRequest:
    """Validate a ModelInferRequest; raises BadRequest (or UnknownModel) naming the field."""
    check_model_version(backend, msg.model_name, msg.model_version)
    values = _input_values(msg)
    try:
        text = values["text_input"].decode()
    except UnicodeDecodeError:
        raise BadRequest("input 'text_input' is not valid UTF-8", "text_input") from None
    outputs = tuple(o.name for o in msg.outputs) or tuple(OUTPUTS)
    for name in outputs:
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output {brief(name)}; outputs are {', '.join(OUTPUTS)}", name)
    fields = _sampling_fields(values.get("sampling_parameters"))
    prompt_ids = await encoder.encode(text, "text_input")
    generate = make_request(
        backend, "kserve", prompt_ids, fields, prompt_param="text_input", param_prefix="sampling_parameters."
    )
    return KServeRequest(generate, bool(values.get("stream", False)), msg.id, outputs)


def infer_response(
    backend, request: KServeRequest, text: str, finish_reason: str | None, final: bool | None
) -> pb.ModelInferResponse:
    """A response carrying `text`; `final` sets triton_final_response (None: not streamed)."""
    values = {"text_output": text, "finish_reason": finish_reason or ""}
    response = pb.ModelInferResponse(model_name=backend.model_name, model_version=MODEL_VERSION, id=request.client_id)
    for name in request.outputs:
        response.outputs.add(name=name, datatype=OUTPUTS[name], shape=[1])
        response.raw_output_contents.append(serialize_bytes(values[name].encode()))
    if final is not None:
        response.parameters[FINAL_RESPONSE].bool_param = final
    return response


def model_metadata(backend) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=backend.model_name,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=[tensor(name=n, datatype=t, shape=[1]) for n, t in INPUTS.items()],
        outputs=[tensor(name=n, datatype=t, shape=[1]) for n, t in OUTPUTS.items()],
    )


def model_config(backend) -> pb.ModelConfig:
    return pb.ModelConfig(
        name=backend.model_name,
        platform=PLATFORM,
        backend=PLATFORM,
        max_batch_size=0,
        input=[
            pb.ModelInput(name=n, data_type=CONFIG_TYPES[t], dims=[1], optional=n != "text_input")
            for n, t in INPUTS.items()
        ],
        output=[pb.ModelOutput(name=n, data_type=CONFIG_TYPES[t], dims=[1]) for n, t in OUTPUTS.items()],
        # Decoupled: a streamed request gets many responses, as Triton's vLLM backend does.
        model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True),
    )
