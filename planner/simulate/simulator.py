"""Discrete-event replay of a workload on a placement, to check the planner's forecast.

A request's way through the simulation (the router's story, architecture.md)::

    arrive -> router picks a prefill instance (least queued work per planned rate) and a
              decode node (the plan's routes, in proportion) and instance (least loaded)
           -> decode reserves the prompt's blocks      (waits while none are free)
           -> prefill queue -> prefill step(s)          (first token: TTFT ends here)
           -> KV transfer over the node's GPU link, or NIC -> NIC (each FIFO at its bandwidth)
           -> decode admits it into the running batch -> decode steps -> finished

Every instance runs the engine's Scheduler (planner/simulate/instance.py); a step lasts what
the latency model says for what the scheduler put in it. TPOT of a request is the time
from its first token to its last over the tokens after the first, so transfer and
admission waits count against TPOT, as a client sees them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from planner.latency.gpus import NodeHardware
from planner.simulate.instance import SimInstance
from planner.simulate.workload import Requests
from planner.solve.capacity import InstanceOption
from proto.cluster import ClusterSpec
from proto.model_spec import ModelSpec
from proto.plan import Metrics
from proto.slo import SLOSpec

WARMUP_FRACTION = 0.1  # without a window: requests that meet an empty cluster are not counted


@dataclass(frozen=True)
class SimResult:
    ttft_s: np.ndarray  # per counted request
    tpot_s: np.ndarray  # per counted request; 0 for one-token outputs

    def attainment(self, slo: SLOSpec) -> float:
        if not len(self.ttft_s):  # a short run whose counted window caught no arrival: no evidence it meets
            return 0.0
        return float(((self.ttft_s <= slo.ttft_s) & (self.tpot_s <= slo.tpot_s)).mean())

    def metrics(self, slo: SLOSpec, rate_rps: float, goodput_rps: float | None) -> Metrics:
        return Metrics(
            rate_rps=round(rate_rps, 4),
            goodput_rps=None if goodput_rps is None else round(goodput_rps, 4),
            attainment=round(self.attainment(slo), 4),
            ttft_s=round(float(np.percentile(self.ttft_s, slo.ttft_percentile)), 4),
            tpot_s=round(float(np.percentile(self.tpot_s, slo.tpot_percentile)), 4),
        )


class Simulator:
    """Replays requests on instances placed on nodes; run() may be called many times."""

    def __init__(
        self,
        instances: list[tuple[str, InstanceOption]],
        routes: dict[tuple[str, str], float],
        cluster: ClusterSpec,
        hardware: dict[str, NodeHardware],
        model: ModelSpec,
        block_size: int,
    ):
        self.instances = instances
        self.routes = routes
        self.cluster = cluster
        self.hardware = hardware
        self.model = model
        self.nic_gb_s = {n.name: n.nic_gb_s for n in cluster.nodes}
        self.kv_bytes_per_token = model.kv_bytes_per_token
        self.block_size = block_size

    def run(self, requests: Requests, window_s: tuple[float, float] | None = None) -> SimResult:
        """Replay requests; count those arriving inside window_s (default: all but the first
        WARMUP_FRACTION), so that counted requests see the cluster loaded, not filling or
        draining."""
        return _Run(self, requests).run(window_s)


@dataclass
class _Request:
    prefill: SimInstance
    decode: SimInstance
    decode_seq: Sequence  # the decode side's sequence, reserved before prefill starts


class _Run:
    def __init__(self, sim: Simulator, requests: Requests):
        self.sim, self.req = sim, requests
        max_model_len = int((requests.input_tokens + requests.output_tokens).max()) + 2
        self.insts = [
            SimInstance(k, node, o, sim.block_size, max_model_len) for k, (node, o) in enumerate(sim.instances)
        ]
        self.prefill = [i for i in self.insts if i.role == "prefill"]
        self.decode_by_node = defaultdict(list)
        for inst in self.insts:
            if inst.role == "decode":
                self.decode_by_node[inst.node].append(inst)
        self.targets: defaultdict[str, dict[str, float]] = defaultdict(dict)  # prefill node -> decode node -> rate
        for (p, d), rate in sim.routes.items():
            if d in self.decode_by_node:
                self.targets[p][d] = rate
        self.sent: defaultdict[tuple[str, str], int] = defaultdict(int)  # (prefill node, decode node) -> routed
        # A prefill instance's planned share: its node's planned prefill rate split over the
        # node's prefill instances by capacity. The router weighs queued work by it, so that
        # the pooled queues (least loaded first) still give each node the load the routes plan.
        planned: defaultdict[str, float] = defaultdict(float)
        for (p, _), rate in sim.routes.items():
            planned[p] += rate
        node_capacity: defaultdict[str, float] = defaultdict(float)
        for inst in self.prefill:
            node_capacity[inst.node] += inst.option.capacity_rps
        self.share = {
            inst.index: max(planned[inst.node] * inst.option.capacity_rps / node_capacity[inst.node], 1e-9)
            for inst in self.prefill
        }
        self.link_free_s: defaultdict[tuple[str, ...], float] = defaultdict(float)  # resource -> when it is free
        self.events: list = []
        self.counter = itertools.count()
        n = len(requests)
        self.first_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.state: dict[int, _Request] = {}  # requests not finished
        self.now = 0.0

    def push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.events, (t, next(self.counter), kind, payload))

    def run(self, window_s: tuple[float, float] | None) -> SimResult:
        if not self.prefill or not self.decode_by_node:
            raise ValueError("simulation needs at least one prefill and one decode instance")
        for i, t in enumerate(self.req.arrival_s):
            self.push(float(t), "arrive", i)
        handlers = {"arrive": self.arrive, "step": self.step_done, "xfer": self.transfer_done}
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            handlers[kind](payload)
        arrival = self.req.arrival_s
        if window_s is None:
            counted = np.arange(len(arrival)) >= int(len(arrival) * WARMUP_FRACTION)
        else:
            counted = (arrival >= window_s[0]) & (arrival <= window_s[1])
        # A request that never finished (a prompt larger than any decode KV) missed its SLO.
        first, done = np.nan_to_num(self.first_s, nan=np.inf), np.nan_to_num(self.done_s, nan=np.inf)
        ttft = (first - arrival)[counted]
        decode_steps = np.maximum(self.req.output_tokens - 1, 1)[counted]
        with np.errstate(invalid="ignore"):  # inf - inf for unfinished requests
            tpot = np.where(self.req.output_tokens[counted] > 1, (done - first)[counted] / decode_steps, 0.0)
        tpot = np.nan_to_num(tpot, nan=np.inf)
        return SimResult(ttft, tpot)

    # ---- router -----------------------------------------------------------------------

    def arrive(self, i: int) -> None:
        prompt, output = int(self.req.input_tokens[i]), int(self.req.output_tokens[i])
        p = min(self.prefill, key=lambda x: x.pending_tokens / self.share[x.index])
        targets = self.targets.get(p.node) or {m: 1.0 for m in self.decode_by_node}
        node = min(targets, key=lambda m: self.sent[p.node, m] / targets[m])
        self.sent[p.node, node] += 1
        d = min(self.decode_by_node[node], key=lambda x: x.num_assigned / x.option.capacity_rps)
        d.num_assigned += 1
        p.pending_tokens += prompt
        self.state[i] = _Request(
            p, d, Sequence(str(i), [0] * prompt, SamplingParams(max_tokens=output, ignore_eos=True))
        )
        d.reserve_queue.append(i)
        self.reserve(d)

    def reserve(self, d: SimInstance) -> None:
        """Start prefill for the requests whose decode blocks are now reserved, in order."""
        while d.reserve_queue:
            r = self.state[d.reserve_queue[0]]
            if not d.try_reserve(r.decode_seq):
                return
            i = d.reserve_queue.popleft()
            prompt = [0] * int(self.req.input_tokens[i])
            r.prefill.add_prefill(Sequence(str(i), prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
            self.kick(r.prefill.index)

    # ---- instances ----------------------------------------------------------------------

    def kick(self, index: int) -> None:
        started = self.insts[index].start_step()
        if started:
            out, duration_s = started
            self.push(self.now + duration_s, "step", (index, out))

    def step_done(self, payload) -> None:
        index, out = payload
        inst = self.insts[index]
        for seq in inst.finish_step(out):
            i = int(seq.request_id)
            if inst.role == "prefill":
                self.prefill_done(inst, i)
            else:
                self.decode_done(inst, i)
        self.kick(index)

    def prefill_done(self, p: SimInstance, i: int) -> None:
        self.first_s[i] = self.now
        prompt = int(self.req.input_tokens[i])
        p.pending_tokens -= prompt
        d = self.state[i].decode
        self.push(self.transfer_end(p.node, d.node, prompt * self.sim.kv_bytes_per_token), "xfer", i)

    def decode_done(self, d: SimInstance, i: int) -> None:
        self.done_s[i] = self.now
        d.num_assigned -= 1
        del self.state[i]
        self.reserve(d)  # its blocks and batch slot are free

    def transfer_end(self, src: str, dst: str, num_bytes: float) -> float:
        """When a transfer of num_bytes from src to dst ends. Every resource on its path (the
        node's GPU link; or the sending NIC, the receiving NIC and a listed link) moves
        bytes first come, first served at its own bandwidth, and the data streams through
        them, so the transfer ends when its slowest resource is done with it."""
        if src == dst:
            path: list[tuple[tuple[str, ...], float]] = [(("local", src), self.sim.hardware[src].link_gb_s)]
        else:
            path = [(("out", src), self.sim.nic_gb_s[src]), (("in", dst), self.sim.nic_gb_s[dst])]
            link = self.sim.cluster.link_gb_s(src, dst)
            if link is not None:
                path.append((("link", min(src, dst), max(src, dst)), link))
        end = self.now
        for resource, gb_s in path:
            done = max(self.now, self.link_free_s[resource]) + num_bytes / (gb_s * 1e9)
            self.link_free_s[resource] = done
            end = max(end, done)
        return end

    def transfer_done(self, i: int) -> None:
        r = self.state[i]
        r.prefill.release(str(i))
        if r.decode.admit(str(i)).is_finished:  # a one-token output
            self.decode_done(r.decode, i)
        self.kick(r.decode.index)
