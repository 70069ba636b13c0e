"""Our KServe .proto is a wire-compatible subset of Triton's, checked against tritonclient's."""

from __future__ import annotations

import tritonclient.grpc.model_config_pb2  # noqa: F401  (registers Triton's ModelConfig)
import tritonclient.grpc.service_pb2 as triton_pb

from proto.kserve import grpc_service_pb2 as pb


def _fields(message) -> dict:
    return {
        f.name: (
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type else None,
            f.enum_type.full_name if f.enum_type else None,
        )
        for f in message.fields
    }


def _check_message(ours, theirs) -> None:
    mine, upstream = _fields(ours), _fields(theirs)
    for name, spec in mine.items():
        assert upstream.get(name) == spec, f"{ours.full_name}.{name}: ours {spec}, Triton's {upstream.get(name)}"
    for nested in ours.nested_types:
        _check_message(nested, theirs.nested_types_by_name[nested.name])


def test_every_message_and_enum_matches_triton():
    triton_pool = triton_pb.DESCRIPTOR.pool
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        _check_message(message, triton_pool.FindMessageTypeByName(message.full_name))
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        theirs = triton_pool.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in theirs.values}


def test_every_method_matches_triton():
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        upstream = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            upstream.input_type.full_name,
            upstream.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (
            upstream.client_streaming,
            upstream.server_streaming,
        )


def test_a_response_reads_back_in_tritons_classes():
    response = pb.ModelInferResponse(id="r1", model_name="m")
    response.parameters["triton_final_response"].bool_param = True
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(b"\x02\x00\x00\x00hi")
    theirs = triton_pb.ModelStreamInferResponse.FromString(
        pb.ModelStreamInferResponse(infer_response=response).SerializeToString()
    )
    assert theirs.infer_response.parameters["triton_final_response"].bool_param
    assert theirs.infer_response.raw_output_contents == [b"\x02\x00\x00\x00hi"]
