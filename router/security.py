"""Who may call the APIs: API keys (HTTP `Authorization: Bearer`, gRPC `authorization`
metadata) and TLS with optional client certificates (mTLS), named as vLLM names them.

Probes stay open: HTTP /health, and gRPC grpc.health.v1.Health, ServerLive and ServerReady.
/metrics needs a key unless the server is told to expose it (metrics are read by scrapers
that seldom carry keys; what they show is load, not content).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

API_KEY_ENV = "TANDEM_API_KEY"  # one key, or several separated by commas
# gRPC methods any caller may use: health checks and liveness / readiness probes.
OPEN_GRPC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
OPEN_HTTP_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class Security:
    """How the frontends admit callers. The defaults admit anyone over plain TCP."""

    api_keys: tuple[str, ...] = ()  # any one of them is accepted; none = no key needed
    public_metrics: bool = False  # /metrics without a key even when keys are set
    ssl_certfile: str | None = None  # PEM certificate (chain) of the server; TLS when set
    ssl_keyfile: str | None = None  # its PEM private key
    ssl_ca_certs: str | None = None  # PEM CA bundle: clients must present a certificate it signed

    def __post_init__(self) -> None:
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ValueError("api keys must be non-empty and have no surrounding whitespace")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both or neither")
        if self.ssl_ca_certs is not None and self.ssl_certfile is None:
            raise ValueError("ssl_ca_certs (client certificates) needs TLS: give ssl_certfile and ssl_keyfile")
        for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a file")

    @classmethod
    def from_keys(cls, keys: Iterable[str] = (), **kwargs) -> Security:
        """Keys given explicitly plus those in $TANDEM_API_KEY (comma-separated)."""
        from_env = [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
        return cls(api_keys=tuple(dict.fromkeys([*keys, *from_env])), **kwargs)

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization value ("Bearer <key>") carries one of the keys."""
        if not self.api_keys:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # compare_digest: the time taken does not tell how much of a key matched.
        return any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.api_keys)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTP server's TLS context (None without TLS)."""
        if self.ssl_certfile is None:  # no TLS
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        if self.ssl_ca_certs is not None:
            context.load_verify_locations(self.ssl_ca_certs)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """The gRPC server's TLS credentials (None without TLS)."""
        if self.ssl_certfile is None or self.ssl_keyfile is None:  # no TLS (__post_init__: both or neither)
            return None
        ca = Path(self.ssl_ca_certs).read_bytes() if self.ssl_ca_certs else None
        pair = (Path(self.ssl_keyfile).read_bytes(), Path(self.ssl_certfile).read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


UNAUTHORIZED = "a valid API key is required: send it as 'Authorization: Bearer <key>'"


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call without a key except the open probes."""

    def __init__(self, security: Security):
        self.security = security

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method in OPEN_GRPC_METHODS:
            return handler
        metadata = dict(details.invocation_metadata or ())
        authorization = metadata.get("authorization")  # str: only "-bin" keys carry bytes
        if self.security.allows(authorization if isinstance(authorization, str) else None):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or streaming) that fails the call unread."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the port on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolved by the OS, may be anything
        return False
