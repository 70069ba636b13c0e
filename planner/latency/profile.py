"""`tandem profile`: measure the real engine here and fit the latency coefficients.

The engine runs one step at a time (engine.LLMEngine): a prompt of T tokens alone in a
step times prefill(T); a batch of B sequences, each with its prompt already in the cache,
times decode steps over K context tokens in all. Medians of a few runs are fitted by
non-negative least squares to the form planner/latency/roofline.py uses:

    prefill ms = a + b T + c T^2          decode ms = A + B K + C batch

On a CPU the device is one core (planner/latency/gpus.py: gpu_type cpu), so the profile binds
itself to `cores` cores (one unless told) with as many compute threads, and files the
entry under gpu_type cpu; measured on all of a machine's cores it would describe a device
that no cluster file counts.
"""

from __future__ import annotations

import bisect
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from planner.latency.roofline import Coefficients, Profile, ProfileEntry

DECODE_STEPS = 4  # decode steps timed per (batch, context)
# torch device name fragments -> GPU table names (more specific fragments first).
GPU_NAMES = (
    ("H200", "H200"),
    ("H100", "H100"),
    ("A100-SXM4-40GB", "A100-40GB"),
    ("A100-PCIE-40GB", "A100-40GB"),
    ("A100", "A100-80GB"),
    ("L40S", "L40S"),
    ("L4", "L4"),
    ("A10G", "A10G"),
    ("T4", "T4"),
    ("V100", "V100"),
)


def fit_nonnegative(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (exhaustive over active sets: 3 features)."""
    best, best_err = np.zeros(features.shape[1]), float("inf")
    for mask in itertools.product((False, True), repeat=features.shape[1]):
        cols = [i for i, on in enumerate(mask) if on]
        if not cols:
            continue
        coef, *_ = np.linalg.lstsq(features[:, cols], target, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(features.shape[1])
        full[cols] = coef
        err = float(((features @ full - target) ** 2).sum())
        if err < best_err:
            best, best_err = full, err
    return best


MIN_FIT_BINS = 3  # distinct step sizes a served fit needs; with fewer, the base coefficients stay


def _binned_medians(rows: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct key, the median of each column (steps of one size, robust to the odd
    step a pause, garbage collection or a neighbour process, stretched) and how many steps
    the key has."""
    keys, counts = np.unique(key, return_counts=True)
    return np.array([np.median(rows[key == k], axis=0) for k in keys]), counts.astype(float)


def _fit_bins(bins: np.ndarray, counts: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Non-negative least squares over the bins, each weighted by the square root of its
    steps: the fit is closest where the server ran most of its steps (equal weights let a few rare large
    batches pull the common small ones' times far off: 8 ms fitted for 32 ms steps)."""
    weight = np.sqrt(counts)[:, None]
    return fit_nonnegative(features * weight, bins[:, -1] * weight[:, 0])


def fit_served(steps, base: Coefficients) -> tuple[Coefficients, dict[str, Any]]:
    """Coefficients fitted to the steps a worker ran while it served (StepRecords from
    EngineLoop.take_steps), in the form the profile fits: prefill-only steps give a, b, c
    (binned by prompt tokens, 16 to a bin), decode-only steps A, B, C (binned by batch size and
    context tokens, 16 to a bin);
    mixed steps are left out; each bin weighs by the square root of its steps (_fit_bins). A
    kind with fewer than MIN_FIT_BINS sizes keeps `base`'s.

    Also returns, per kind, how many steps were used and the median ratio of the served
    time to what `base` predicts for the same step: how much slower serving is than the
    profile taken alone."""
    pre = np.array([(s.prefill_tokens, s.attn_tokens2, s.ms) for s in steps if s.num_decodes == 0], dtype=float)
    dec = np.array([(s.num_decodes, s.context_tokens, s.ms) for s in steps if s.prefill_tokens == 0], dtype=float)
    fitted = dict(a=base.a, b=base.b, c=base.c, A=base.A, B=base.B, C=base.C)
    report: dict[str, Any] = {}
    if len(pre):
        predicted = base.a + base.b * pre[:, 0] + base.c * pre[:, 1]
        report["prefill"] = {"steps": len(pre), "served_over_base": float(np.median(pre[:, 2] / predicted))}
        bins, counts = _binned_medians(pre, pre[:, 0] // 16)
        if len(bins) >= MIN_FIT_BINS:
            a, b, c = _fit_bins(bins, counts, np.stack([np.ones(len(bins)), bins[:, 0], bins[:, 1]], axis=1))
            fitted.update(a=float(a), b=float(b), c=float(c))
    if len(dec):
        predicted = base.A + base.B * dec[:, 1] + base.C * dec[:, 0]
        report["decode"] = {"steps": len(dec), "served_over_base": float(np.median(dec[:, 2] / predicted))}
        bins, counts = _binned_medians(dec, dec[:, 0] * 1e6 + dec[:, 1] // 16)
        if len(bins) >= MIN_FIT_BINS:
            features = np.stack([np.ones(len(bins)), bins[:, 1], bins[:, 0]], axis=1)
            big_a, big_b, big_c = _fit_bins(bins, counts, features)
            fitted.update(A=float(big_a), B=float(big_b), C=float(big_c))
    return Coefficients(**fitted, source=base.source), report


NEIGHBOUR_ALONE, NEIGHBOUR_BESIDE = 0.0, 0.9  # overlap fractions: none; at least this much
NEIGHBOUR_MIN_STEPS = 5  # steps of one size needed on each side to compare them


def step_size(step) -> tuple[int, int]:
    """The size neighbour_overlap compares like with like by: decodes in the batch, and
    prompt tokens to 16."""
    return step.num_decodes, step.prefill_tokens // 16


def neighbour_overlap(steps, neighbour_steps) -> dict[str, Any]:
    """How much longer a worker's steps ran while a neighbour (another worker on the same
    machine, sharing its memory bandwidth and caches) ran steps than while it ran none.

    A step is "alone" when no neighbour step overlapped it and "beside" when neighbour steps
    covered at least NEIGHBOUR_BESIDE of it; steps without a start time (at_s 0) are left
    out. Like is compared with like: per step size (step_size) with NEIGHBOUR_MIN_STEPS of
    each, the ratio of the median beside to the median alone, and `beside_over_alone` is the
    median of those ratios (None with no size to compare)."""
    spans = sorted((s.at_s, s.at_s + s.ms / 1e3) for s in neighbour_steps if s.at_s)
    starts = [a for a, _ in spans]
    ms: dict[str, dict[tuple[int, int], list[float]]] = {"alone": {}, "beside": {}}
    for s in steps:
        if not s.at_s or s.ms <= 0:
            continue
        begin, end = s.at_s, s.at_s + s.ms / 1e3
        # A worker runs one step at a time: its spans are disjoint, sorted by start.
        k = max(bisect.bisect_right(starts, begin) - 1, 0)
        covered = 0.0
        while k < len(spans) and spans[k][0] < end:
            covered += max(0.0, min(end, spans[k][1]) - max(begin, spans[k][0]))
            k += 1
        share = covered / (end - begin)
        label = "alone" if share <= NEIGHBOUR_ALONE else "beside" if share >= NEIGHBOUR_BESIDE else None
        if label is not None:
            ms[label].setdefault(step_size(s), []).append(s.ms)
    ratios = [
        float(np.median(beside) / np.median(ms["alone"][size]))
        for size, beside in ms["beside"].items()
        if len(beside) >= NEIGHBOUR_MIN_STEPS and len(ms["alone"].get(size, ())) >= NEIGHBOUR_MIN_STEPS
    ]
    return {
        "alone_steps": sum(map(len, ms["alone"].values())),
        "beside_steps": sum(map(len, ms["beside"].values())),
        "sizes_compared": len(ratios),
        "beside_over_alone": float(np.median(ratios)) if ratios else None,
    }


def refit_profile(
    base: Profile, prefill_steps, decode_steps, gpu_type: str | None = None, tp: int = 1, pp: int = 1
) -> tuple[Profile, dict[str, Any]]:
    """`base` with one entry refitted to served steps: its prefill coefficients to the prefill
    workers' steps, its decode ones to the decode workers' (fit_served). The entry is the one
    for (gpu_type, tp, pp); gpu_type None means the profile's only entry. Also returns, per
    kind, the steps used and how much slower they ran than the entry predicts."""
    if gpu_type is None:
        if len(base.entries) != 1:
            named = ", ".join(f"{e.gpu_type} tp {e.tp} pp {e.pp}" for e in base.entries)
            raise ValueError(
                f"the profile has {len(base.entries)} entries ({named}): name one with --gpu-type/--tp/--pp"
            )
        gpu_type, tp, pp = base.entries[0].gpu_type, base.entries[0].tp, base.entries[0].pp
    coeffs = base.find(gpu_type, tp, pp)
    if coeffs is None:
        named = ", ".join(f"{e.gpu_type} tp {e.tp} pp {e.pp}" for e in base.entries)
        raise ValueError(f"the profile has no entry for {gpu_type} tp {tp} pp {pp}; it has: {named}")
    prefill, prefill_report = fit_served(prefill_steps, coeffs)
    decode, decode_report = fit_served(decode_steps, coeffs)
    served = Coefficients(
        a=prefill.a, b=prefill.b, c=prefill.c, A=decode.A, B=decode.B, C=decode.C, source=coeffs.source
    )
    entries = tuple(
        ProfileEntry(e.gpu_type, e.tp, e.pp, served) if (e.gpu_type, e.tp, e.pp) == (gpu_type, tp, pp) else e
        for e in base.entries
    )
    report = {
        "prefill": prefill_report.get("prefill", {"steps": 0}),
        "decode": decode_report.get("decode", {"steps": 0}),
    }
    return Profile(base.model, entries), report


def describe_refit(report: dict[str, Any], coeffs: Coefficients) -> str:
    """One line: what the refit used and the coefficients it gave."""
    used = ", ".join(
        f"{kind}: {r['steps']} steps served"
        + (f", median {r['served_over_base']:.2f}x the profile's" if "served_over_base" in r else "")
        for kind, r in report.items()
    )
    return (
        f"{used}; prefill ms = {coeffs.a:.3g} + {coeffs.b:.3g} T + {coeffs.c:.3g} T^2, "
        f"decode ms = {coeffs.A:.3g} + {coeffs.B:.3g} K + {coeffs.C:.3g} batch"
    )


def detect_gpu_type(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    for fragment, gpu_type in GPU_NAMES:
        if fragment in name:
            return gpu_type
    return name


@contextmanager
def bound_to_cores(num_cores: int | None) -> Iterator[tuple[int, ...]]:
    """Run the body on the first num_cores cores this process may use, with as many torch
    threads (engine/cores.py), and give the process its cores and threads back after.
    None leaves everything as it is and yields the cores in use."""
    import torch

    from engine.cores import available_cores, bind_cores

    cores = available_cores()
    if num_cores is None:
        yield tuple(cores)
        return
    if num_cores > len(cores):
        raise ValueError(f"--cores {num_cores}: this process may run on {len(cores)} cores {cores}")
    threads = torch.get_num_threads()
    bind_cores(cores[:num_cores])
    try:
        yield tuple(cores[:num_cores])
    finally:  # bind_cores would refuse cores the bound process no longer has: set them directly
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except (ProcessLookupError, PermissionError):  # a thread that just ended
                continue
        torch.set_num_threads(threads)


def _timed_step(engine) -> tuple[float, Any]:
    start = time.perf_counter()
    out = engine.schedule()
    engine.run(out)
    return (time.perf_counter() - start) * 1e3, out


def measure_prefill(engine, tokens: tuple[int, ...], repeats: int, rng) -> list[tuple[int, float]]:
    from engine import SamplingParams

    points = []
    vocab = engine.model_config.vocab_size
    for k, t in itertools.product(range(repeats), tokens):  # repeats interleaved: noise spreads
        engine.add_request(
            f"prefill-{t}-{k}", rng.integers(2, vocab, t).tolist(), SamplingParams(max_tokens=1, ignore_eos=True)
        )
        ms, _ = _timed_step(engine)
        points.append((t, ms))
        while engine.has_unfinished():
            engine.step()
    return points


def measure_decode(
    engine, batches: tuple[int, ...], contexts: tuple[int, ...], repeats: int, rng
) -> list[tuple[int, int, float]]:
    """(batch, context tokens in the batch, ms) per timed decode step."""
    from engine import SamplingParams

    points = []
    vocab = engine.model_config.vocab_size
    for k, b, ctx in itertools.product(range(repeats), batches, contexts):
        for j in range(b):
            engine.add_request(
                f"decode-{b}-{ctx}-{k}-{j}",
                rng.integers(2, vocab, ctx).tolist(),
                SamplingParams(max_tokens=DECODE_STEPS + 2, ignore_eos=True),
            )
        started: set[str] = set()
        while len(started) < b:  # prefill every prompt first
            started.update(o.request_id for o in engine.step())
        for _ in range(DECODE_STEPS):
            ms, out = _timed_step(engine)
            # After the step a decoded sequence has computed exactly the tokens it attended to.
            context = sum(item.seq.num_computed_tokens for item in out.scheduled)
            points.append((len(out.scheduled), context, ms))
        while engine.has_unfinished():
            engine.step()
    return points


def profile_engine(
    model_dir: str | None,
    prefill_tokens: tuple[int, ...],
    decode_batches: tuple[int, ...],
    decode_contexts: tuple[int, ...],
    gpu_type: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    repeats: int = 3,
    cores: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Profile:
    """Time the engine over the grid (prompt lengths; decode batches x contexts) and fit.

    On a CPU device the process computes on `cores` cores (default one: the planner's cpu
    device, under which the entry is filed unless gpu_type names another)."""
    from engine.llm_engine import resolve_device

    say = progress or (lambda _msg: None)
    on_cpu = resolve_device(device) == "cpu"
    if cores is not None and not on_cpu:
        raise ValueError(f"--cores binds a profile to CPU cores: use it with --device cpu, not {device!r}")
    if on_cpu and gpu_type in (None, "cpu"):
        if cores not in (None, 1):
            raise ValueError(
                f"--cores {cores}: gpu_type cpu is one core (a cluster's cpu node counts cores), "
                f"so its profile runs on --cores 1; to file what {cores} cores measure, name it "
                f"with --gpu-type"
            )
        gpu_type, cores = "cpu", 1
    with bound_to_cores(cores) as used:
        if on_cpu:
            say(f"computing on cores {list(used)}")
        return _profile(
            model_dir, prefill_tokens, decode_batches, decode_contexts, gpu_type, dtype, device, repeats, progress
        )


def _profile(
    model_dir: str | None,
    prefill_tokens: tuple[int, ...],
    decode_batches: tuple[int, ...],
    decode_contexts: tuple[int, ...],
    gpu_type: str | None,
    dtype: str,
    device: str,
    repeats: int,
    progress: Callable[[str], None] | None,
) -> Profile:
    from engine import EngineConfig, LLMEngine, ModelConfig
    from engine.default_model import ensure_default_model

    say = progress or (lambda _msg: None)
    path = Path(model_dir or ensure_default_model())
    # Points past the model's context window cannot run; three are the least a fit needs.
    window = ModelConfig.from_dir(path).max_position_embeddings
    prefill_tokens = tuple(t for t in prefill_tokens if t < window)
    decode_contexts = tuple(c for c in decode_contexts if c + DECODE_STEPS + 2 < window)
    if len(prefill_tokens) < 3 or not decode_contexts:
        raise ValueError(f"model {path.name} has a context window of {window} tokens: too short to profile")
    max_len = min(max(max(prefill_tokens), max(decode_contexts) + DECODE_STEPS + 2) + 1, window)
    config = EngineConfig(
        dtype=dtype,
        device=device,
        max_num_seqs=max(decode_batches),
        max_num_batched_tokens=max(max(prefill_tokens), max(decode_contexts)),
        max_model_len=max_len,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(path, config)
    gpu_type = gpu_type or detect_gpu_type(engine.device)
    say(f"profiling {path.name} on {engine.device} ({gpu_type}), {engine.dtype}")
    rng = np.random.default_rng(0)
    measure_prefill(engine, prefill_tokens[:1], 1, rng)  # warm-up: first-call allocations
    prefill = measure_prefill(engine, prefill_tokens, repeats, rng)
    say(f"  prefill: {len(prefill)} steps timed")
    decode = measure_decode(engine, decode_batches, decode_contexts, repeats, rng)
    say(f"  decode: {len(decode)} steps timed")
    pre = {t: statistics.median(ms for tt, ms in prefill if tt == t) for t in prefill_tokens}
    t = np.array(list(pre), dtype=float)
    a, b, c = fit_nonnegative(np.stack([np.ones_like(t), t, t * t], axis=1), np.array(list(pre.values())))
    rows = np.array(decode, dtype=float)
    big_a, big_b, big_c = fit_nonnegative(np.stack([np.ones(len(rows)), rows[:, 1], rows[:, 0]], axis=1), rows[:, 2])
    coeffs = Coefficients(
        a=float(a), b=float(b), c=float(c), A=float(big_a), B=float(big_b), C=float(big_c), source="profile"
    )
    return Profile(model=path.resolve().name, entries=(ProfileEntry(gpu_type, 1, 1, coeffs),))
