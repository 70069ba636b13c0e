"""Starting prefill and decode actors on a Ray cluster, and the backend that routes over them."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from decode_worker.actor import DecodeActor, DecodeFollowerActor
from deploy.cores import CorePlan, RankCores, plan_cores
from deploy.ray_clients import RayDecodeClient, RayPrefillClient, RayRoleClient
from elastic.role_actor import RoleActor
from engine import EngineConfig
from kv_transfer.auth import deployment_secret
from prefill_worker.actor import PrefillActor, PrefillFollowerActor
from proto.plan import ray_resource_name
from proto.serving import Role
from router.orchestrator import DisaggregatedBackend

# Times Ray restarts a dead worker (of one rank) over the deployment's life; each restart
# reloads the model. Bounded, so that a worker that dies at every start is given up on.
WORKER_MAX_RESTARTS = 10
RESTART_TIMEOUT_S = 300.0  # a restarted worker loads its model again


@dataclass(frozen=True)
class WorkerGroup:
    """Identical workers of one role. A worker is tp x pp processes (pp pipeline stages of tp
    tensor-parallel ranks), each with one GPU on a GPU cluster or `num_cpus` CPUs without
    GPUs, all on one node."""

    role: Role  # PREFILL or DECODE (the plan's strings are accepted: Role is a str)
    count: int
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline stages; with a layer-split plan's stage sizes in pipeline_layers
    gpu_type: str | None = None  # adds the Ray resource GPU_<type> (a heterogeneous cluster)
    num_cpus: float = 1.0  # CPUs per worker when it runs without GPUs
    use_gpus: bool = False
    max_num_seqs: int | None = None  # engine batch limits planned for this group (None: the defaults)
    max_num_batched_tokens: int | None = None
    pipeline_layers: tuple[int, ...] | None = None  # layers of each stage (None: an even split)
    # A layer-split chain's stages, each on its own node of its own GPU type (None: every stage
    # is gpu_type, and the worker's ranks share a node).
    stage_gpu_types: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.role not in (Role.PREFILL, Role.DECODE):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        object.__setattr__(self, "role", Role(self.role))
        if self.count < 0 or self.tp < 1 or self.pp < 1:
            raise ValueError(f"count must be >= 0 and tp, pp >= 1, got count={self.count}, tp={self.tp}, pp={self.pp}")
        if self.stage_gpu_types is not None and len(self.stage_gpu_types) != self.pp:
            raise ValueError(f"stage_gpu_types names {len(self.stage_gpu_types)} stages, pp is {self.pp}")

    @property
    def ranks(self) -> int:
        """Processes per worker."""
        return self.tp * self.pp

    @property
    def spans_nodes(self) -> bool:
        """A layer-split chain: its stages are on different nodes."""
        return self.stage_gpu_types is not None and self.pp > 1

    def rank_bundle(self, rank: int) -> dict[str, float]:
        """One rank's resources."""
        if not self.use_gpus:
            return {"CPU": self.num_cpus}
        bundle = {"CPU": 1.0, "GPU": 1.0}
        gpu_type = self.gpu_type if self.stage_gpu_types is None else self.stage_gpu_types[rank // self.tp]
        if gpu_type:
            bundle[ray_resource_name(gpu_type)] = 1.0
        return bundle

    def bundles(self) -> list[dict[str, float]]:
        """One worker's resources: a bundle per rank (all on one node unless spans_nodes)."""
        return [self.rank_bundle(rank) for rank in range(self.ranks)]

    @property
    def placement_strategy(self) -> str:
        """A worker's ranks share a node (NCCL/Gloo within it); a chain's stages are packed onto
        as few nodes as hold them, each stage's tp ranks together where a node has room."""
        return "PACK" if self.spans_nodes else "STRICT_PACK"

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        return replace(
            base,
            tensor_parallel_size=self.tp,
            pipeline_parallel_size=self.pp,
            pipeline_layers=self.pipeline_layers,
            max_num_seqs=base.max_num_seqs if self.max_num_seqs is None else self.max_num_seqs,
            max_num_batched_tokens=(
                base.max_num_batched_tokens if self.max_num_batched_tokens is None else self.max_num_batched_tokens
            ),
        )


@dataclass
class Deployment:
    """Running actors and the placement group that holds their resources."""

    backend: DisaggregatedBackend
    prefill_actors: list = field(default_factory=list)  # rank 0 of each prefill worker
    decode_actors: list = field(default_factory=list)
    follower_actors: list = field(default_factory=list)  # ranks > 0 of tensor-parallel workers
    placement_groups: list = field(default_factory=list)
    cores: CorePlan | None = None  # which cores each CPU worker rank owns, and the router's
    infos: list = field(default_factory=list)  # each worker's WorkerInfo: prefill workers, then decode

    def shutdown(self) -> None:
        # Rank 0 first: its shutdown releases its followers, whose own shutdown waits for that.
        for actor in self.prefill_actors + self.decode_actors + self.follower_actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # a dead actor has nothing left to shut down
                pass
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)

    async def restart_worker(self, role: Role | str, index: int, timeout_s: float = RESTART_TIMEOUT_S) -> int:
        """One step of a rolling restart, losing no request: drain the worker (its requests
        move to the others), restart its process (Ray restarts it: a worker of one rank, with
        max_restarts left), wait until it serves again and route to it again. Returns how many
        requests moved. Call on the router's event loop."""
        role = Role(role)
        actor = cast(Any, self.backend.client(role, index)).actor  # ValueError naming the indices there are
        info = await actor.info.remote()
        if info.layout.tp_size * info.layout.pp_size > 1:
            raise ValueError(
                f"{role.value} worker {index} has {info.layout.tp_size * info.layout.pp_size} ranks "
                f"(tp {info.layout.tp_size} x pp {info.layout.pp_size}), which Ray does not restart "
                f"alone; replace the worker instead"
            )
        moved = await self.backend.drain(role, index)
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + timeout_s
        while True:  # calls fail until the process is replaced, then wait for its model to load
            try:
                await asyncio.wait_for(actor.info.remote(), max(1.0, deadline - time.monotonic()))
                break
            except ray.exceptions.RayActorError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{role.value} worker {index} did not come back within {timeout_s:g} s"
                    ) from None
                await asyncio.sleep(0.5)
        await self.backend.wait_up(role, index, max(1.0, deadline - time.monotonic()))
        self.backend.undrain(role, index)
        return moved


def deploy(
    model_dir: str | Path,
    groups: list[WorkerGroup],
    engine_config: EngineConfig,
    *,
    kv_backend: str,
    model_name: str,
    policy: str = "load",
    local_prefill_tokens: int = 32,
    transfer_timeout_s: float = 30.0,
    ready_timeout_s: float = 300.0,
    kv_secret: bytes | None = None,
    pin_cores: bool | None = None,
    max_restarts: int = WORKER_MAX_RESTARTS,
    elastic: bool = False,
) -> Deployment:
    """Reserve every worker's resources in one placement group, start the actors, wait until ready.

    Decode workers' KV receivers listen on loopback when the Ray cluster is this one node,
    and on their node's IP otherwise (prefill workers may be elsewhere). Every worker gets the
    deployment's KV secret (kv_secret, else $TANDEM_KV_SECRET, else a new one): KV moves only
    between workers that hold it. CPU workers get cores of their own (deploy/cores.py: pin_cores
    True insists, None pins when the nodes have the cores, False never pins). A worker of one
    rank whose process dies is restarted by Ray up to max_restarts times (-1: always); the
    router runs its requests again elsewhere meanwhile (router/orchestrator.py). elastic: every
    worker can change role while serving (elastic/role_actor.py; one rank each), for online
    P:D rebalancing (router/rebalance.py).
    """
    kv_secret = kv_secret or deployment_secret()
    single_node = sum(1 for n in ray.nodes() if n["Alive"]) == 1
    host = "127.0.0.1" if single_node else None
    # On one node, UCX (nixl) keeps its listeners on loopback too, unless the user chose devices.
    env_vars = {"UCX_NET_DEVICES": "lo"} if single_node and "UCX_NET_DEVICES" not in os.environ else {}
    model_dir = str(Path(model_dir).resolve())
    workers = [g for g in groups for _ in range(g.count)]
    # One placement group per worker, packed onto one node (a TP group's ranks talk over
    # NCCL/Gloo and must share a node), or onto the nodes of a layer-split chain's stages.
    check_capacity(groups)
    if elastic and any(g.ranks > 1 for g in groups if g.count):
        raise ValueError("workers that change role (--autoscale) run one rank each: use tp=1 and pp=1 for both roles")
    if elastic and len({g.engine_config(engine_config) for g in groups if g.count}) > 1:
        raise ValueError(
            "workers that change role (--autoscale) keep their engine: both roles need the same batch limits "
            "(max_num_seqs, max_num_batched_tokens), which the workers' groups do not have"
        )
    pgs = [placement_group(g.bundles(), strategy=g.placement_strategy) for g in workers]
    try:
        ray.get([pg.ready() for pg in pgs], timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        for pg in pgs:
            remove_placement_group(pg)
        raise TimeoutError(
            f"the workers' resources ({describe(groups)}) were not free within "
            f"{ready_timeout_s:g} s; the Ray cluster has {_fmt(ray.available_resources())} "
            f"available now"
        ) from None
    try:
        cores = plan_cores(workers, pgs, pin_cores)
    except BaseException:
        for pg in pgs:
            remove_placement_group(pg)
        raise
    prefill_actors: list[Any] = []
    decode_actors: list[Any] = []
    followers: list[Any] = []
    for group, pg, rank_cores in zip(workers, pgs, cores.ranks, strict=True):
        options = [
            _rank_options(group, pg, rank, rank_cores[rank], env_vars, max_restarts) for rank in range(group.ranks)
        ]
        pinned = [c.cores if c is not None else None for c in rank_cores]
        config = group.engine_config(engine_config)
        dist_init = _dist_init(pg, single_node) if group.ranks > 1 else None
        ranks = range(1, group.ranks)
        if elastic:
            (prefill_actors if group.role is Role.PREFILL else decode_actors).append(
                ray.remote(RoleActor)
                .options(**options[0])
                .remote(
                    model_dir,
                    config,
                    kv_backend,
                    group.role,
                    host,
                    transfer_timeout_s,
                    kv_secret=kv_secret,
                    cores=pinned[0],
                )
            )
        elif group.role is Role.PREFILL:
            driver = (
                ray.remote(PrefillActor)
                .options(**options[0])
                .remote(
                    model_dir, config, kv_backend, transfer_timeout_s, dist_init, kv_secret=kv_secret, cores=pinned[0]
                )
            )
            prefill_actors.append(driver)
            followers += [
                ray.remote(PrefillFollowerActor)
                .options(**options[rank])
                .remote(
                    model_dir,
                    config,
                    kv_backend,
                    transfer_timeout_s,
                    rank,
                    dist_init,
                    kv_secret=kv_secret,
                    cores=pinned[rank],
                )
                for rank in ranks
            ]
        else:
            decode_followers = [
                ray.remote(DecodeFollowerActor)
                .options(**options[rank])
                .remote(model_dir, config, kv_backend, host, rank, dist_init, kv_secret=kv_secret, cores=pinned[rank])
                for rank in ranks
            ]
            decode_actors.append(
                ray.remote(DecodeActor)
                .options(**options[0])
                .remote(
                    model_dir,
                    config,
                    kv_backend,
                    host,
                    transfer_timeout_s,
                    dist_init=dist_init,
                    kv_secret=kv_secret,
                    cores=pinned[0],
                )
            )
            followers += decode_followers
    # Waiting for every worker's info is also waiting until every worker is up.
    infos = ray.get([a.info.remote() for a in prefill_actors + decode_actors], timeout=ready_timeout_s)
    decode = infos[len(prefill_actors)]  # what decode workers run with is what requests must fit
    if elastic:  # one client per worker, whatever role it has at a time
        names = [f"worker {i}" for i in range(len(prefill_actors) + len(decode_actors))]
        prefill_clients: list = [RayRoleClient(a, n, Role.PREFILL) for a, n in zip(prefill_actors, names, strict=False)]
        decode_clients: list = [
            RayRoleClient(a, n, Role.DECODE) for a, n in zip(decode_actors, names[len(prefill_actors) :], strict=True)
        ]
    else:
        prefill_clients = [RayPrefillClient(a, f"prefill worker {i}") for i, a in enumerate(prefill_actors)]
        decode_clients = [RayDecodeClient(a, f"decode worker {i}") for i, a in enumerate(decode_actors)]
    backend = DisaggregatedBackend(
        model_dir,
        prefill_clients,
        decode_clients,
        model_name=model_name,
        max_model_len=decode.max_model_len,
        block_size=decode.layout.block_size,
        kv_bytes_per_token=decode.layout.model_bytes_per_token,
        policy=policy,
        local_prefill_tokens=local_prefill_tokens,
    )
    return Deployment(backend, prefill_actors, decode_actors, followers, pgs, cores, infos)


def check_capacity(groups: list[WorkerGroup]) -> None:
    """Refuse, naming the resource, workers that the Ray cluster could never hold."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    total: Counter = sum((Counter(resources) for resources in nodes), Counter())
    per_worker = [(g, sum((Counter(b) for b in g.bundles()), Counter())) for g in groups if g.count]
    need: Counter = sum((Counter({k: v * g.count for k, v in w.items()}) for g, w in per_worker), Counter())
    short = [
        f"{need[k]:g} {k} (the cluster has {total.get(k, 0):g})" for k in sorted(need) if need[k] > total.get(k, 0)
    ]
    if short:
        raise ValueError(
            f"the workers ({describe(groups)}) need {', '.join(short)}: give Ray more "
            f"(e.g. ray start --num-cpus/--num-gpus) or ask for fewer workers or ranks"
        )
    for g, worker in per_worker:
        if g.spans_nodes:
            for rank, bundle in enumerate(g.bundles()):
                if not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
                    raise ValueError(
                        f"rank {rank} of a {g.role} chain needs {_fmt(bundle)}; no node of the Ray cluster has that"
                    )
            continue
        if not any(all(node.get(k, 0) >= v for k, v in worker.items()) for node in nodes):
            raise ValueError(
                f"a {g.role} worker with tp={g.tp} pp={g.pp} needs {_fmt(worker)} on one node "
                f"(its ranks share a node); no node of the Ray cluster has that"
            )


def describe(groups: list[WorkerGroup]) -> str:
    return ", ".join(
        f"{g.count} {g.role} x tp={g.tp}"
        + (f" pp={g.pp}" if g.pp > 1 else "")
        + (f" layers {'|'.join(map(str, g.pipeline_layers))}" if g.pipeline_layers else "")
        + (f" on {g.gpu_type}" if g.gpu_type else "")
        + (f" on {' -> '.join(t or 'cpu' for t in g.stage_gpu_types)}" if g.stage_gpu_types else "")
        for g in groups
        if g.count
    )


def _fmt(resources) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") or k.startswith("GPU_"))


def _rank_options(
    group: WorkerGroup,
    pg: PlacementGroup,
    rank: int,
    cores: RankCores | None,
    env_vars: dict[str, str],
    max_restarts: int,
) -> dict[str, Any]:
    """Ray actor options for one rank of a worker: its bundle of the worker's placement group,
    its thread count when it runs on CPU cores of its own, and how often Ray restarts it when
    its process dies. Only a worker of one rank restarts: the ranks of a tensor-parallel
    worker share a process group, which one rank cannot rejoin alone."""
    bundle = group.bundles()[rank]
    threads = cores.env() if cores is not None else {}
    return dict(
        max_restarts=max_restarts if group.ranks == 1 else 0,
        max_task_retries=0,  # a call to a lost worker fails: the router runs the request again
        num_cpus=bundle["CPU"],
        num_gpus=bundle.get("GPU", 0),
        resources={k: v for k, v in bundle.items() if k.startswith("GPU_")},
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
        max_concurrency=1000,
        runtime_env={"env_vars": {**env_vars, **threads}},
    )


def _dist_init(pg, single_node: bool) -> str:
    """The address a TP group's ranks meet at: rank 0's node, a port free there (probed here;
    on another node a port taken meanwhile makes the group fail to form, loudly)."""
    if single_node:
        host = "127.0.0.1"
    else:
        node_id = placement_group_table(pg)["bundles_to_node_id"][0]
        host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    with socket.socket() as s:
        s.bind(("", 0))
        return f"tcp://{host}:{s.getsockname()[1]}"
