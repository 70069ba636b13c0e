"""A worker that changes role without reloading its model.

One engine (weights and KV cache, loaded once) runs under a prefill shell or a decode shell:
prefill_worker.PrefillWorker or decode_worker.DecodeWorker built over it. set_role() closes
the current shell (its engine loop and KV endpoints, not the engine) once it is idle, and
builds the other over the same engine: a role change takes milliseconds, not a model load.
The router drains the worker first (DisaggregatedBackend.change_role), so nothing is on it.

It answers every call of both roles (in process it is both a router.clients.PrefillClient
and a DecodeClient); a call of the role it does not have now raises Unavailable. Workers of
one tensor-parallel rank only: the followers of a TP group run a role-specific follow loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

from decode_worker.actor import DecodeActor, node_ip
from decode_worker.worker import DecodeWorker
from engine import EngineConfig, LLMEngine
from engine.cores import bind_cores
from prefill_worker.actor import PrefillActor
from prefill_worker.worker import PrefillWorker
from proto.errors import Unavailable
from proto.serving import (
    Detached,
    GenerateRequest,
    KVHandle,
    PrefillResult,
    Role,
    StepRecord,
    TokenDelta,
    WorkerInfo,
    WorkerStats,
)

IDLE_POLL_S = 0.02
IDLE_TIMEOUT_S = 30.0  # how long set_role waits for what a drain left (blocks a transfer still reads)


class RoleActor:
    """Created with ray.remote(...) by deploy/ (tandem serve --autoscale); every method runs on
    the actor's event loop."""

    def __init__(
        self,
        model_dir: str,
        engine_config: EngineConfig,
        kv_backend: str,
        role: Role | str,
        host: str | None = None,
        transfer_timeout_s: float = 30.0,
        max_waiting: int = 256,
        *,
        kv_secret: bytes,
        cores: Sequence[int] | None = None,
    ):
        if engine_config.tensor_parallel_size != 1:
            raise ValueError(
                f"a worker that changes role runs one rank; got tensor_parallel_size="
                f"{engine_config.tensor_parallel_size}"
            )
        if cores:
            bind_cores(cores)
        self._model_dir, self._config, self._kv_backend = model_dir, engine_config, kv_backend
        self._host = host or node_ip()
        self._transfer_timeout_s, self._max_waiting, self._kv_secret = transfer_timeout_s, max_waiting, kv_secret
        self.engine = LLMEngine(model_dir, engine_config, rank=0)
        self.incarnation = uuid.uuid4().hex  # new in every process: a restarted worker's differs
        self._prefill: PrefillActor | None = None
        self._decode: DecodeActor | None = None
        self._role = Role(role)
        self._set_shell(self._build(self._role))
        self._switch: asyncio.Lock | None = None  # made on the actor's event loop
        self.role_changes = 0

    @property
    def role(self) -> Role:
        return self._role

    def _build(self, role: Role) -> PrefillActor | DecodeActor:
        if role is Role.PREFILL:
            worker = PrefillWorker(
                self._model_dir,
                self._config,
                self._kv_backend,
                self._transfer_timeout_s,
                kv_secret=self._kv_secret,
                engine=self.engine,
            )
            return PrefillActor.over(worker)
        decode = DecodeWorker(
            self._model_dir,
            self._config,
            self._kv_backend,
            self._host,
            self._transfer_timeout_s,
            self._max_waiting,
            kv_secret=self._kv_secret,
            engine=self.engine,
        )
        return DecodeActor.over(decode)

    def _set_shell(self, shell: PrefillActor | DecodeActor) -> None:
        """On the actor's event loop (or in the constructor): the shell calls go to from now on."""
        self._prefill = shell if isinstance(shell, PrefillActor) else None
        self._decode = shell if isinstance(shell, DecodeActor) else None
        self._role = Role.PREFILL if self._prefill is not None else Role.DECODE

    def _busy(self, stats: WorkerStats) -> int:
        """Requests (or their blocks) still on it, detached ones included."""
        counted = stats.num_waiting + stats.num_running + stats.num_reserved + stats.num_held + stats.num_transfers
        return max(counted, len(self.engine.requests))

    async def set_role(self, role: Role | str, idle_timeout_s: float = IDLE_TIMEOUT_S) -> float:
        """Serve as `role` from now on; returns the seconds the change took (0 if it has that
        role already). The worker must hold no request (drain it first): it waits up to
        idle_timeout_s for the last blocks to be let go, then refuses with ValueError. One
        change at a time; calls meanwhile answer Unavailable. If the new shell cannot be built,
        the old role's is built again and the error raised."""
        roles = {r.value: r for r in (Role.PREFILL, Role.DECODE)}
        if str(role) not in roles:
            raise ValueError(f"role must be one of {sorted(roles)}, got {role!r}")
        new = roles[str(role)]
        if self._switch is None:
            self._switch = asyncio.Lock()
        async with self._switch:
            if new is self._role:
                return 0.0
            started = time.monotonic()
            deadline = started + idle_timeout_s
            while busy := self._busy(await self.stats()):
                if time.monotonic() >= deadline:
                    raise ValueError(
                        f"the {self._role.value} worker still holds {busy} requests after {idle_timeout_s:g} s: "
                        "drain it first"
                    )
                await asyncio.sleep(IDLE_POLL_S)
            old_role, old = self._role, self._shell()
            self._prefill = self._decode = None  # calls answer Unavailable until the new shell is up
            if isinstance(old, DecodeActor):
                old.close_channel()
            await asyncio.to_thread(old.worker.close, True)
            # A call that was already past the role check when the shell closed may have left
            # a request in the engine: nobody serves it any more.
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
            try:
                shell = await asyncio.to_thread(self._build, new)
            except BaseException:
                self._set_shell(await asyncio.to_thread(self._build, old_role))
                raise
            self._set_shell(shell)
            self.role_changes += 1
            return time.monotonic() - started

    def _as_prefill(self) -> PrefillActor:
        if self._prefill is None:
            raise Unavailable(self._not_serving(Role.PREFILL))
        return self._prefill

    def _as_decode(self) -> DecodeActor:
        if self._decode is None:
            raise Unavailable(self._not_serving(Role.DECODE))
        return self._decode

    def _not_serving(self, role: Role) -> str:
        if self._prefill is None and self._decode is None:
            return "this worker is changing role"
        return f"this worker serves as a {self._role.value} worker now, not as a {role.value} worker"

    def _shell(self) -> PrefillActor | DecodeActor:
        return self._prefill if self._prefill is not None else self._as_decode()

    # ---- both roles ----------------------------------------------------------------------

    async def abort(self, request_id: str) -> None:
        await self._shell().abort(request_id)

    async def stats(self) -> WorkerStats:
        return await self._shell().stats()

    async def take_steps(self) -> list[StepRecord]:
        return await self._shell().take_steps()

    async def role_stats(self) -> tuple[str, Role, WorkerStats]:
        """Its incarnation, role and gauges in one call (a restarted worker comes back in the
        role it was started with, as a new incarnation; the Ray client then puts it back in
        the role the router has it in)."""
        return self.incarnation, self._role, await self.stats()

    def info(self) -> WorkerInfo:
        return self._shell().info()

    def shutdown(self) -> None:
        self._shell().worker.close()

    # ---- the prefill role ------------------------------------------------------------------

    async def prefill(self, request: GenerateRequest, handle: KVHandle) -> PrefillResult:
        return await self._as_prefill().prefill(request, handle)

    # ---- the decode role (DecodeActor's calls) ---------------------------------------------

    async def reserve(self, request: GenerateRequest) -> KVHandle:
        return await self._as_decode().reserve(request)

    async def admit(self, request_id: str, first_token_id: int) -> AsyncGenerator[TokenDelta, None]:
        async for delta in self._as_decode().admit(request_id, first_token_id):
            yield delta

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        async for delta in self._as_decode().generate(request):
            yield delta

    async def detach(self, request_id: str) -> Detached:
        return await self._as_decode().detach(request_id)

    async def migrate_out(self, request_id: str, handle: KVHandle) -> None:
        await self._as_decode().migrate_out(request_id, handle)

    async def reattach(self, request_id: str) -> AsyncGenerator[TokenDelta, None]:
        async for delta in self._as_decode().reattach(request_id):
            yield delta

    async def start_reattach(self, request_id: str) -> None:
        await self._as_decode().start_reattach(request_id)

    async def start_admit(self, request_id: str, first_token_id: int) -> None:
        await self._as_decode().start_admit(request_id, first_token_id)

    async def start_generate(self, request: GenerateRequest) -> None:
        await self._as_decode().start_generate(request)

    async def deltas(self) -> AsyncGenerator[list[TokenDelta], None]:
        async for batch in self._as_decode().deltas():
            yield batch
