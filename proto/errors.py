"""Why a request was refused or lost, as every side names it: workers raise these, clients
carry them across the process boundary as themselves, and the frontends map each to one
status (router/http_server.py, router/grpc_server.py)."""

from __future__ import annotations


class Overloaded(RuntimeError):
    """Admission control refused a request: max_waiting requests wait already (HTTP 429,
    gRPC RESOURCE_EXHAUSTED)."""


class Unavailable(RuntimeError):
    """Nothing can serve the request now: a worker stopped or broke, no worker of a role is up,
    or the server is shutting down. The same request may succeed later (HTTP 503, gRPC
    UNAVAILABLE)."""


class WorkerLost(Unavailable):
    """A worker died or stopped answering while it held the request."""


class RequestAborted(RuntimeError):
    """The request was aborted before (or while) it was admitted."""
