"""The KServe v2 / Triton gRPC frontend (grpc.aio), with health checking and reflection.

ModelInfer answers one request with the whole text. ModelStreamInfer is Triton's decoupled
streaming: requests on one stream run concurrently, each gets one response per text delta
(input `stream` true) or one response (false), and its last response carries the parameter
triton_final_response=true. A request that fails on a stream gets a response with
error_message "<STATUS>: <message>" and the stream stays open, as in Triton; on ModelInfer
the call fails with that status. Cancelling a call aborts its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from proto.errors import Overloaded, Unavailable
from proto.kserve import grpc_service_pb2 as pb
from proto.kserve import grpc_service_pb2_grpc as pb_grpc
from router.kserve import (
    FINAL_RESPONSE,
    KServeRequest,
    check_model_version,
    infer_response,
    model_config,
    model_metadata,
    parse_infer_request,
)
from router.requests import BadRequest, UnknownModel
from router.security import KeyInterceptor
from router.streaming import RequestFailed, Serving, stream_deltas

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "tandem"
FRONTEND = "grpc"
log = logging.getLogger(__name__)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failed request ends with."""
    if isinstance(exc, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, RequestFailed):
        return (grpc.StatusCode.UNAVAILABLE if exc.retryable else grpc.StatusCode.INTERNAL), str(exc)
    log.error("request failed unexpectedly", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, serving: Serving, server_version: str):
        self.serving = serving
        self.backend = serving.backend
        self.metrics = serving.metrics
        self.server_version = server_version
        self.closing = asyncio.Event()  # set at the end of a shutdown: open streams end (status OK)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.backend.is_ready())

    async def ModelReady(self, request, context):
        # Triton answers "not ready" rather than NOT_FOUND for a model it does not serve.
        try:
            check_model_version(self.backend, request.name, request.version)
        except UnknownModel:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.backend.is_ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.server_version)

    async def ModelMetadata(self, request, context):
        await self._check_model(request, context)
        return model_metadata(self.backend)

    async def ModelConfig(self, request, context):
        await self._check_model(request, context)
        return pb.ModelConfigResponse(config=model_config(self.backend))

    async def _check_model(self, request, context) -> None:
        try:
            check_model_version(self.backend, request.name, request.version)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def _parse(self, msg: pb.ModelInferRequest, streaming_call: bool) -> KServeRequest:
        try:
            request = await parse_infer_request(self.backend, self.serving.encoder, msg)
            if request.stream and not streaming_call:
                raise BadRequest(
                    "input 'stream' is true, which needs ModelStreamInfer; "
                    "ModelInfer returns the whole text in one response",
                    "stream",
                )
            return request
        except BadRequest as exc:
            self.metrics.count(FRONTEND, "not_found" if isinstance(exc, UnknownModel) else "invalid")
            raise

    async def _whole_text(self, request: KServeRequest) -> tuple[str, str | None]:
        parts, finish_reason = [], None
        deltas = stream_deltas(self.serving, FRONTEND, request.generate)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                parts.append(delta.text)
                finish_reason = delta.finish_reason
        return "".join(parts), finish_reason

    async def ModelInfer(self, msg, context):
        try:
            request = await self._parse(msg, streaming_call=False)
            text, finish_reason = await self._whole_text(request)
            return infer_response(self.backend, request, text, finish_reason, final=None)
        except Exception as exc:  # every failure becomes a status; cancellation is not an Exception
            await context.abort(*status_of(exc))

    async def ModelStreamInfer(self, request_iterator, context):
        # Responses of all the stream's requests, interleaved, in the order they are made.
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()  # the stream's unfinished requests

        async def read_requests() -> None:
            try:
                async for msg in request_iterator:
                    task = asyncio.create_task(self._stream_one(msg, responses.put_nowait))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)  # a long-lived stream must not pile them up
            finally:
                # The client half-closed (or the server closes): the stream ends once its
                # requests are answered.
                await asyncio.gather(*tasks, return_exceptions=True)
                responses.put_nowait(None)

        async def close_at_shutdown() -> None:
            # The server's last step: stop reading, let the stream's requests (already cut)
            # send their last responses, then end the stream with status OK.
            await self.closing.wait()
            reader.cancel()

        reader = asyncio.create_task(read_requests())
        closer = asyncio.create_task(close_at_shutdown())
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:
            closer.cancel()  # normal end, or the call was cancelled: closing the tasks aborts their requests
            running = (reader, *tasks)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _stream_one(self, msg: pb.ModelInferRequest, emit: Callable[[pb.ModelStreamInferResponse], None]) -> None:
        try:
            request = await self._parse(msg, streaming_call=True)
            if not request.stream:
                text, finish_reason = await self._whole_text(request)
                emit(
                    pb.ModelStreamInferResponse(
                        infer_response=infer_response(self.backend, request, text, finish_reason, final=True)
                    )
                )
                return
            deltas = stream_deltas(self.serving, FRONTEND, request.generate)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    if delta.text or delta.finished:
                        emit(
                            pb.ModelStreamInferResponse(
                                infer_response=infer_response(
                                    self.backend, request, delta.text, delta.finish_reason, final=delta.finished
                                )
                            )
                        )
        except Exception as exc:
            code, message = status_of(exc)
            # The id and the final flag let a client tell which request ended, even though
            # tritonclient itself reads only error_message from such a response.
            failed = pb.ModelInferResponse(model_name=msg.model_name, id=msg.id)
            failed.parameters[FINAL_RESPONSE].bool_param = True
            emit(pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=failed))


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose answer for the inference service follows Backend.is_ready(): on
    every Check, and for Watch streams whenever the server refreshes the backend's health."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    async def publish(self) -> None:
        ready = self.backend.is_ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.set(service, status)  # ignored once shutting down: NOT_SERVING stays

    async def Check(self, request, context):
        await self.publish()
        return await super().Check(request, context)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    # Our messages live in a private pool (see proto/kserve/generate.sh); reflection needs
    # every service it lists in one pool.
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(file.serialized_pb)
    return pool


async def start_grpc_server(
    serving: Serving, host: str, port: int, server_version: str
) -> tuple[grpc.aio.Server, InferenceServicer, HealthServicer, int]:
    """Start serving; returns the server, its servicers and the bound port."""
    security = serving.security
    # Larger messages cannot hold a request that fits the context window: refused unread.
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", serving.encoder.max_request_bytes)],
        interceptors=[KeyInterceptor(security)] if security.api_keys else None,
    )
    servicer = InferenceServicer(serving, server_version)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = HealthServicer(serving.backend)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=_reflection_pool())
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = security.grpc_credentials()
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    return server, servicer, health_servicer, bound
