"""Tensor parallelism: one engine spread over the GPUs of a worker, one process per rank.

The model is built whole, then sharded from the outside (shard_model), so model.py holds
no parallelism code. Each rank keeps a contiguous share of the heads and of the MLP:

    qkv_proj   [q heads | k heads | v heads] rows  -> this rank's q, k and v heads (column-parallel)
    o_proj     columns of this rank's q heads       -> partial sums, all-reduced (row-parallel)
    gate_up    [gate | up] rows                     -> this rank's slice of gate and of up
    down_proj  columns of that slice                -> partial sums, all-reduced
    embedding, norms, lm_head                       -> replicated (simple; the vocab is not split)

Row-parallel biases are kept by rank 0 only, so that the all-reduce adds them once. Query
head h reads KV head h // (num_heads / num_kv_heads), so contiguous shares keep every
rank's queries next to their KV heads, and rank r's KV cache holds exactly the heads
[r * H_kv / tp, (r + 1) * H_kv / tp): KVLayout(tp_rank=r, tp_size=tp) says so to KV transfers.

The ranks run in lockstep, driven by rank 0::

    rank 0 (driver)                                   rank r > 0 (follower)
    scheduler, block manager, sampler, tokenizer      the sharded model and its KV cache only
    step(): schedule -> plan the batch                follow(on_step):
            broadcast StepMessage(step, payload) ---->  receive StepMessage
            forward (all-reduces) <-----------------+-> hook = on_step(payload); forward(hook)
            sample, post-process                        (until the driver's close())

The step travels as plain lists (StepInputs) on a Gloo group even when the model's
all-reduces use NCCL; every rank builds its own tensors from it. The payload is whatever
picklable data the driver attaches to the step with LLMEngine.run(..., step_payload=...):
a prefill worker sends the KV transfers that start in this step (request ids, block ids,
destinations), and each follower's on_step(payload) starts its own rank's sender and
returns the per-layer hook that pushes each layer once it is stored, exactly as the
driver's on_layer_stored does on rank 0. Each rank's engine.kv_cache (tensor and layout) is
what that rank's KV sender or receiver is built on.

Rank 0 also talks to the other ranks at these turns, for the worker around the engine (a
tensor-parallel worker's ranks share no other line): when it asks, each follower answers the
step with a report (report(), e.g. the KV transfer parts it settled since the last one),
gathered on rank 0 before the forward; and when rank 0 has nothing to run but something to
tell or to hear (a decode worker registering blocks, or waiting for a part to settle), it
sends a turn without a batch (exchange()). So a worker's control traffic costs one small
collective per step, and none while it has none.

Failure and shutdown: the driver's close() tells the followers to stop, and their follow()
returns. The followers wait for the next step for as long as the server is idle (the
control group has no practical timeout); a rank whose process dies closes its sockets, so
the other ranks' pending receive or all-reduce fails at once instead of hanging. A follower
whose step fails leaves the group the same way; a driver that fails but lives on must
close() its engine for that effect.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model import DecoderLayer, LlamaModel
from engine.model_runner import ModelRunner, StepInputs
from engine.scheduler import ScheduledSeq

# Followers block on the control group between steps, however long the server idles.
CONTROL_TIMEOUT = timedelta(days=365)

# Runs on every follower when a step arrives: payload in, per-layer hook (or None) out.
OnStep = Callable[[object], Callable[[int], None] | None]
# Runs on every follower when rank 0 asks for reports: what this rank has to tell it.
Report = Callable[[], object]
# Runs on rank 0 with the followers' reports (ranks 1..tp-1, in order).
OnReports = Callable[[list[object]], None]


def check_tp_size(config: ModelConfig, tp_size: int) -> None:
    """Refuse a TP size that does not split the model's heads and MLP evenly."""
    if tp_size <= 0:
        raise ValueError(f"tensor_parallel_size must be positive, got {tp_size}")
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide the model's "
                f"{name}={value} (num_heads={config.num_heads}, num_kv_heads="
                f"{config.num_kv_heads}, intermediate_size={config.intermediate_size}); "
                f"choose a size that divides all three"
            )


def rank_device(device: str, rank: int) -> str:
    """A rank's device. 'cuda' means GPU `rank` when this process sees several GPUs, and its
    only GPU when it sees one (one GPU per process, as Ray assigns them)."""
    if device != "cuda":
        return device
    count = torch.cuda.device_count()
    if count == 1:
        return "cuda:0"
    if rank >= count:
        raise ValueError(f"tp_rank={rank} needs GPU {rank}, but this process sees {count} GPUs")
    return f"cuda:{rank}"


class RankGroup:
    """This process's membership in the group of one engine's ranks: pp stages of tp ranks,
    rank = pp_rank * tp_size + tp_rank.

    compute: the default process group (NCCL on GPU, Gloo on CPU) for the activations sent
    stage to stage; tp: the stage's ranks, for the all-reduces (None: the whole group, pp=1);
    control: a Gloo group of every rank for the driver's step broadcasts and small agreements.
    Created before the model is sharded; close() leaves them all.
    """

    def __init__(self, rank: int, tp_size: int, pp_size: int, init_method: str | None, device: str):
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a process group: one engine rank per process")
        self.rank = rank
        self.tp_size, self.pp_size = tp_size, pp_size
        self.world_size = tp_size * pp_size
        self.pp_rank, self.tp_rank = divmod(rank, tp_size)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, world_size=self.world_size, rank=rank)
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.tp: dist.ProcessGroup | None = None
        if pp_size > 1 and tp_size > 1:  # every rank makes every stage's group, in the same order
            for stage in range(pp_size):
                group = dist.new_group(ranks=[stage * tp_size + r for r in range(tp_size)])
                if stage == self.pp_rank:
                    self.tp = group
        self.closed = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """The rank of this rank's TP peer in stage pp_rank (where activations go or come from)."""
        return pp_rank * self.tp_size + self.tp_rank

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV blocks that fit: all ranks need the same)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def broadcast(self, msg: StepMessage | None) -> StepMessage:
        """The driver sends msg; every other rank passes None and gets the driver's."""
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.control)
        received = box[0]
        assert received is not None, "the driver always sends a message"
        return received

    def gather(self, report: object) -> list[object]:
        """Every rank's report, in rank order, on the driver ([] on the other ranks)."""
        box: list[object] | None = [None] * self.world_size if self.is_driver else None
        dist.gather_object(report, box, dst=0, group=self.control)
        return box or []

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            dist.destroy_process_group()


# ---- sharding ---------------------------------------------------------------------------------


def _share(start: int, size: int, rank: int, world_size: int) -> slice:
    """The rank's contiguous share of the range [start, start + size)."""
    n = size // world_size
    return slice(start + rank * n, start + (rank + 1) * n)


def _keep_rows(linear: nn.Linear, shares: list[slice]) -> None:
    """Column-parallel: keep the output rows (and bias entries) in shares, in order."""
    linear.weight = nn.Parameter(torch.cat([linear.weight[s] for s in shares]), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.cat([linear.bias[s] for s in shares]), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _keep_columns(linear: nn.Linear, share: slice, rank: int, group: dist.ProcessGroup | None) -> None:
    """Row-parallel: keep the input columns in share; the output becomes a partial sum that
    is all-reduced (over `group`; None: the default group) after the layer. Only rank 0 adds
    the bias."""
    linear.weight = nn.Parameter(linear.weight[:, share].contiguous(), requires_grad=False)
    linear.in_features = linear.weight.shape[1]
    if rank != 0:
        linear.register_parameter("bias", None)

    def all_reduce_output(_module: nn.Module, _inputs: tuple[object, ...], output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    linear.register_forward_hook(all_reduce_output)


def shard_model(model: LlamaModel, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> LlamaModel:
    """Cut a whole model down, in place, to tensor-parallel rank `rank` of `world_size`.

    Call once, after the weights are loaded and with the process groups up (the row-parallel
    layers all-reduce over `group`, by default the default group, in every forward). Returns
    the model.
    """
    config = model.config
    check_tp_size(config, world_size)
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.num_heads == config.num_heads, "the model is already sharded"
        q_size, kv_size = attn.q_size, attn.kv_size
        _keep_rows(
            attn.qkv_proj,
            [
                _share(0, q_size, rank, world_size),
                _share(q_size, kv_size, rank, world_size),
                _share(q_size + kv_size, kv_size, rank, world_size),
            ],
        )
        _keep_columns(attn.o_proj, _share(0, q_size, rank, world_size), rank, group)
        attn.num_heads //= world_size
        attn.num_kv_heads //= world_size
        attn.q_size //= world_size
        attn.kv_size //= world_size

        inter = mlp.intermediate_size
        _keep_rows(mlp.gate_up_proj, [_share(0, inter, rank, world_size), _share(inter, inter, rank, world_size)])
        _keep_columns(mlp.down_proj, _share(0, inter, rank, world_size), rank, group)
        mlp.intermediate_size //= world_size
    return model


# ---- pipeline stages -------------------------------------------------------------------------


def stage_bounds(num_layers: int, pp_size: int, layers: Sequence[int] | None = None) -> tuple[int, ...]:
    """Stage s holds layers [b[s], b[s + 1]) of the returned b. layers: each stage's count (an
    uneven split, e.g. a layer-split plan's); default as even as can be, earlier stages one more."""
    if pp_size <= 0:
        raise ValueError(f"pipeline_parallel_size must be positive, got {pp_size}")
    if layers is None:
        if pp_size > num_layers:
            raise ValueError(f"pipeline_parallel_size={pp_size} exceeds the model's num_layers={num_layers}")
        base, extra = divmod(num_layers, pp_size)
        layers = [base + (s < extra) for s in range(pp_size)]
    if len(layers) != pp_size or any(n <= 0 for n in layers) or sum(layers) != num_layers:
        raise ValueError(
            f"pipeline_layers {tuple(layers)} must give each of the {pp_size} stages a positive count "
            f"and add up to the model's num_layers={num_layers}"
        )
    return tuple(itertools.accumulate(layers, initial=0))


def keep_layers(model: LlamaModel, start: int, end: int) -> LlamaModel:
    """Cut a whole model down, in place, to the decoder layers [start, end) of a pipeline
    stage. Embedding, final norm and LM head stay (stage 0's driver embeds and samples; the
    last stage normalises)."""
    model.layers = nn.ModuleList(list(model.layers)[start:end])
    model.layer_start = start
    return model


def split_batch(scheduled: list[ScheduledSeq], parts: int) -> list[list[ScheduledSeq]]:
    """The step cut into at most `parts` contiguous micro-batches of about equal tokens, none
    empty. Contiguous: decodes stay before prompt chunks in each, and the sampled rows, read
    micro-batch after micro-batch, stay in step order."""
    n = min(parts, len(scheduled))
    total = sum(item.num_new_tokens for item in scheduled)
    groups: list[list[ScheduledSeq]] = []
    current: list[ScheduledSeq] = []
    tokens = 0
    for i, item in enumerate(scheduled):
        current.append(item)
        tokens += item.num_new_tokens
        groups_left = n - len(groups) - 1
        items_left = len(scheduled) - i - 1
        if groups_left > 0 and (tokens * n >= total * (len(groups) + 1) or items_left == groups_left):
            groups.append(current)
            current = []
    groups.append(current)
    return groups


# ---- lockstep execution -----------------------------------------------------------------------


@dataclass(frozen=True)
class StepMessage:
    """What the driver broadcasts at each turn, before its forward."""

    steps: tuple[StepInputs, ...]  # the batch to run, as micro-batches (one without stages); (): no forward
    payload: object = None  # picklable data for the followers' on_step (e.g. transfers starting)
    gather: bool = False  # every follower answers with its report() before the forward
    stop: bool = False  # the followers leave follow()


class GroupRunner(ModelRunner):
    """A ModelRunner on one rank of a RankGroup: the driver broadcasts each step before running
    it, the followers run the steps they receive.

    With pipeline stages the step is cut into micro-batches (split_batch); each stage runs
    them in order, taking each one's activations from the stage before and sending its own on
    at once (isend), so that stage s + 1 works on micro-batch j while stage s works on j + 1.
    The last stage sends the sampled rows' final hidden states to the driver, which computes
    the logits. A step then costs about (m + pp - 1) / (m * pp) of one device running the
    whole batch through the whole model (the pipeline's fill and drain bubble), plus the sends.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, group: RankGroup, microbatches: int | None = None):
        super().__init__(model, kv_cache)
        self.group = group
        self.microbatches = microbatches or group.pp_size

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSeq],
        on_layer_stored: Callable[[int], None] | None = None,
        step_payload: object = None,
        on_reports: OnReports | None = None,
    ) -> torch.Tensor:
        """Driver: run one step on every rank; returns the logits, as ModelRunner.execute.
        on_reports: gather the followers' reports first and hand them to it."""
        steps: tuple[StepInputs, ...]
        if self.group.pp_size == 1:
            steps = (self.plan(scheduled),)
        else:
            steps = tuple(self.plan(part) for part in split_batch(scheduled, self.microbatches))
        self._turn(steps, step_payload, on_reports)
        hidden = self.run_steps(steps, on_layer_stored)
        assert hidden is not None, "the driver gets the sampled rows"
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def run_steps(
        self, steps: tuple[StepInputs, ...], on_layer_stored: Callable[[int], None] | None
    ) -> torch.Tensor | None:
        """This rank's part of one step. On the driver: the sampled rows' final hidden states,
        in step order; None on the other ranks of a pipeline."""
        if self.group.pp_size == 1:
            return self.forward(steps[0], on_layer_stored)
        group, model = self.group, self.model
        width, dtype = model.config.hidden_size, model.embed_tokens.weight.dtype
        sending: list[tuple[dist.Work | None, torch.Tensor]] = []
        for j, step in enumerate(steps):
            ids, positions, meta, rows = self.tensors(step)
            if group.is_first_stage:
                x = model.embed_tokens(ids)
            else:
                x = torch.empty((len(step.input_ids), width), dtype=dtype, device=self.device)
                dist.recv(x, src=group.stage_rank(group.pp_rank - 1), tag=j)
            # A layer is stored for the whole step once the last micro-batch has run it.
            hook = on_layer_stored if j == len(steps) - 1 else None
            x = model.run_layers(x, positions, meta, self.kv_cache, hook)
            if not group.is_last_stage:
                sending.append((dist.isend(x, dst=group.stage_rank(group.pp_rank + 1), tag=j), x))
            elif group.tp_rank == 0 and step.sample_indices:
                out = model.norm(x[rows]).contiguous()
                sending.append((dist.isend(out, dst=0, tag=len(steps) + j), out))
        for work, _ in sending:
            assert work is not None, "isend returns a request in the group it belongs to"
            work.wait()
        if not group.is_driver:
            return None
        last = group.world_size - group.tp_size  # tp rank 0 of the last stage
        sampled = []
        for j, step in enumerate(steps):
            if step.sample_indices:
                h = torch.empty((len(step.sample_indices), width), dtype=dtype, device=self.device)
                dist.recv(h, src=last, tag=len(steps) + j)
                sampled.append(h)
        return torch.cat(sampled) if sampled else torch.empty((0, width), dtype=dtype, device=self.device)

    def exchange(self, payload: object = None, on_reports: OnReports | None = None) -> None:
        """Driver: a turn without a batch, to send a payload or to hear the followers' reports."""
        self._turn((), payload, on_reports)

    def _turn(self, steps: tuple[StepInputs, ...], payload: object, on_reports: OnReports | None) -> None:
        if not self.group.is_driver:
            raise RuntimeError(f"rank {self.group.rank} follows rank 0: call follow(), not step()")
        self.group.broadcast(StepMessage(steps, payload, gather=on_reports is not None))
        if on_reports is not None:
            on_reports(self.group.gather(None)[1:])

    def follow(self, on_step: OnStep | None = None, report: Report | None = None) -> None:
        """Follower: run the driver's turns until it stops the group."""
        if self.group.is_driver:
            raise RuntimeError("rank 0 drives the group: it steps, it does not follow")
        try:
            while not (msg := self.group.broadcast(None)).stop:
                hook = on_step(msg.payload) if on_step is not None else None
                if msg.gather:
                    self.group.gather(report() if report is not None else None)
                if msg.steps:
                    self.run_steps(msg.steps, hook)
            self.group.barrier()
        except BaseException:
            self.group.close()  # the driver's pending all-reduce fails now, not at a timeout
            raise

    def stop_followers(self) -> None:
        """Driver: end every follower's follow()."""
        self.group.broadcast(StepMessage((), stop=True))
        self.group.barrier()
