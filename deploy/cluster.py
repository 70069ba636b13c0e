"""Starting prefill and decode actors on a Ray cluster, and the backend that routes over them."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from decode_worker.actor import DecodeActor, DecodeFollowerActor
from engine import EngineConfig
from prefill_worker.actor import PrefillActor, PrefillFollowerActor
from proto.plan import ray_resource_name
from router.orchestrator import DisaggregatedBackend


@dataclass(frozen=True)
class WorkerGroup:
    """Identical workers of one role. On GPUs each takes `tp` GPUs; on CPU, `num_cpus` CPUs."""

    role: str  # "prefill" | "decode"
    count: int
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline stages; a worker holds tp x pp GPUs on a GPU cluster
    gpu_type: str | None = None  # adds the Ray resource GPU_<type> (a heterogeneous cluster)
    num_cpus: float = 1.0  # CPUs per worker when it runs without GPUs
    use_gpus: bool = False
    max_num_seqs: int | None = None  # engine batch limits planned for this group (None: the defaults)
    max_num_batched_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        if self.count < 0 or self.tp < 1 or self.pp < 1:
            raise ValueError(f"count must be >= 0 and tp, pp >= 1, got count={self.count}, tp={self.tp}, pp={self.pp}")

    def bundle(self) -> dict[str, float]:
        if not self.use_gpus:
            return {"CPU": self.num_cpus}
        num_gpus = float(self.tp * self.pp)
        bundle = {"CPU": 1.0, "GPU": num_gpus}
        if self.gpu_type:
            bundle[ray_resource_name(self.gpu_type)] = num_gpus
        return bundle

    @property
    def tensor_parallel(self) -> bool:
        """Whether a worker runs as tp rank processes. Workers with pp > 1 (pipeline stages are
        not implemented) run one engine on one device, holding all their GPUs."""
        return self.tp > 1 and self.pp == 1

    def bundles(self) -> list[dict[str, float]]:
        """One worker's resources: one bundle per rank (all on one node), or one for all."""
        if not self.tensor_parallel:
            return [self.bundle()]
        return [replace(self, tp=1).bundle()] * self.tp

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        overrides = {k: v for k, v in (("max_num_seqs", self.max_num_seqs),
                                       ("max_num_batched_tokens", self.max_num_batched_tokens)) if v is not None}
        if self.tensor_parallel:
            overrides["tensor_parallel_size"] = self.tp
        return replace(base, **overrides)


@dataclass
class Deployment:
    """Running actors and the placement group that holds their resources."""

    backend: DisaggregatedBackend
    prefill_actors: list = field(default_factory=list)  # rank 0 of each prefill worker
    decode_actors: list = field(default_factory=list)
    follower_actors: list = field(default_factory=list)  # ranks > 0 of tensor-parallel workers
    placement_groups: list = field(default_factory=list)

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


def deploy(model_dir: str | Path, groups: list[WorkerGroup], engine_config: EngineConfig, *,
           kv_backend: str, model_name: str, policy: str = "load", local_prefill_tokens: int = 32,
           transfer_timeout_s: float = 30.0, ready_timeout_s: float = 300.0) -> Deployment:
    """Reserve every worker's resources in one placement group, start the actors, wait until ready.

    Decode workers' KV receivers listen on loopback when the Ray cluster is this one node,
    and on their node's IP otherwise (prefill workers may be elsewhere).
    """
    single_node = sum(1 for n in ray.nodes() if n["Alive"]) == 1
    host = "127.0.0.1" if single_node else None
    model_dir = str(Path(model_dir).resolve())
    workers = [g for g in groups for _ in range(g.count)]
    # One placement group per worker, packed onto one node: a TP group's ranks talk over
    # NCCL/Gloo and must share a node.
    pgs = [placement_group(g.bundles(), strategy="STRICT_PACK") for g in workers]
    ray.get([pg.ready() for pg in pgs], timeout=ready_timeout_s)
    prefill_actors, decode_actors, followers = [], [], []
    for group, pg in zip(workers, pgs):
        def options(rank: int) -> dict:
            bundle = group.bundles()[rank]
            return dict(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                        resources={k: v for k, v in bundle.items() if k.startswith("GPU_")},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                        max_concurrency=1000)
        config = group.engine_config(engine_config)
        dist_init = _dist_init(pg, single_node) if group.tensor_parallel else None
        ranks = range(1, len(group.bundles()))
        if group.role == "prefill":
            driver = ray.remote(PrefillActor).options(**options(0)).remote(
                model_dir, config, kv_backend, transfer_timeout_s, dist_init)
            prefill_actors.append(driver)
            followers += [ray.remote(PrefillFollowerActor).options(**options(rank)).remote(
                model_dir, config, kv_backend, transfer_timeout_s, rank, dist_init, driver)
                for rank in ranks]
        else:  # followers first: rank 0 asks them for their KV receivers' endpoints
            decode_followers = [ray.remote(DecodeFollowerActor).options(**options(rank)).remote(
                model_dir, config, kv_backend, host, rank, dist_init) for rank in ranks]
            decode_actors.append(ray.remote(DecodeActor).options(**options(0)).remote(
                model_dir, config, kv_backend, host, transfer_timeout_s, dist_init=dist_init,
                followers=decode_followers))
            followers += decode_followers
    # Waiting for every worker's info is also waiting until every worker is up.
    infos = ray.get([a.info.remote() for a in prefill_actors + decode_actors], timeout=ready_timeout_s)
    decode = infos[len(prefill_actors)]  # what decode workers run with is what requests must fit
    backend = DisaggregatedBackend(
        model_dir, prefill_actors, decode_actors, model_name=model_name, max_model_len=decode.max_model_len,
        block_size=decode.layout.block_size,
        kv_bytes_per_token=decode.layout.bytes_per_token * decode.layout.tp_size,
        policy=policy, local_prefill_tokens=local_prefill_tokens)
    return Deployment(backend, prefill_actors, decode_actors, followers, pgs)


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
