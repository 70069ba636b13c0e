"""Starting prefill and decode actors on a Ray cluster, and the backend that routes over them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from decode_worker.actor import DecodeActor
from engine import EngineConfig, ModelConfig
from prefill_worker.actor import PrefillActor
from proto.kv import DTYPE_BYTES
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

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        overrides = {k: v for k, v in (("max_num_seqs", self.max_num_seqs),
                                       ("max_num_batched_tokens", self.max_num_batched_tokens)) if v is not None}
        return replace(base, **overrides)


@dataclass
class Deployment:
    """Running actors and the placement group that holds their resources."""

    backend: DisaggregatedBackend
    prefill_actors: list = field(default_factory=list)
    decode_actors: list = field(default_factory=list)
    placement_group: object = None

    def shutdown(self) -> None:
        for actor in self.prefill_actors + self.decode_actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # a dead actor has nothing left to shut down
                pass
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)


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
    model = ModelConfig.from_dir(model_dir)
    workers = [g for g in groups for _ in range(g.count)]
    pg = placement_group([g.bundle() for g in workers], strategy="PACK")
    ray.get(pg.ready(), timeout=ready_timeout_s)
    prefill_actors, decode_actors = [], []
    for index, group in enumerate(workers):
        options = dict(num_cpus=group.bundle()["CPU"], num_gpus=group.bundle().get("GPU", 0),
                       resources={k: v for k, v in group.bundle().items() if k.startswith("GPU_")},
                       scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
                       max_concurrency=1000)
        if group.role == "prefill":
            actor = ray.remote(PrefillActor).options(**options).remote(
                model_dir, group.engine_config(engine_config), kv_backend, transfer_timeout_s)
            prefill_actors.append(actor)
        else:
            actor = ray.remote(DecodeActor).options(**options).remote(
                model_dir, group.engine_config(engine_config), kv_backend, host, transfer_timeout_s)
            decode_actors.append(actor)
    block_sizes = ray.get([a.block_size.remote() for a in prefill_actors + decode_actors], timeout=ready_timeout_s)
    dtype = engine_config.dtype if engine_config.dtype != "auto" else "float32"
    backend = DisaggregatedBackend(
        model_dir, prefill_actors, decode_actors, model_name=model_name,
        max_model_len=engine_config.max_model_len or min(model.max_position_embeddings, 4096),
        vocab_size=model.vocab_size, block_size=block_sizes[0],
        kv_bytes_per_token=2 * model.num_layers * model.num_kv_heads * model.head_dim * DTYPE_BYTES[dtype],
        policy=policy, local_prefill_tokens=local_prefill_tokens)
    return Deployment(backend, prefill_actors, decode_actors, pg)
