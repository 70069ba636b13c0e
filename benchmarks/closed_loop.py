"""The closed loop: profile one core, plan for CPU cores, serve the plan, replay its workload.

    tandem profile --device cpu --cores 1   -> profile.yaml        the model's step times on one core
    cluster.yaml: one node, gpu_type cpu     (each of this machine's cores is a device)
    tandem plan --profile profile.yaml      -> <workload>/plan.yaml forecast, and simulation
    tandem serve --plan <workload>/plan.yaml                        workers on a core each
    replay the requests the plan's simulation ran, at the plan's rate and around it
    refit the profile to the steps the workers ran while serving    -> <workload>/served-profile.yaml
    plan, serve and replay again with it                            -> <workload>/served/
                                            -> <workload>/results.json; table.md, plot.png, run.json

The second round is the loop closed: the planner learns from what was served. A worker's
step as served costs more than the same step profiled alone: the two workers' cores share
the machine's memory bandwidth and caches, so a decode step runs slower while the prefill
worker computes beside it (benchmarks/cpu_neighbours.py; the router and Ray take a few per
cent of a core besides), and near the rate a plan picks, a few per cent of step time decide
between a stable queue and a growing one. Each worker records every step it runs
(StepRecord: the step's shape in the latency model's terms, its time and when it started);
planner.latency.profile.fit_served fits them in the profile's form, and the second plan,
simulation and measurement use that fit. The fit comes from the first round's runs and is
checked against a fresh server's: measured out of sample. The refit also says how each
worker's steps ran while the other computed and while it was idle (neighbour_overlap).
Each run's requests are recorded (`requests-<multiple>x.json`) for benchmarks/sim_vs_served.py,
which runs the simulator on the very same requests beside them.

Two workloads, each planned and served on its own: Poisson arrivals, and bursty ones (Gamma
gaps of CV 2: BurstGPT, arXiv:2401.17644, fits production LLM traffic with such gaps).
Lengths: lognormal prompts (median 128 tokens, at most 512), uniform outputs (16-64 tokens).
The SLO is in units of what the profile says one request alone takes, so that the loop asks
the same of any machine: P90 TTFT <= 4x the prefill of a P90 prompt, P90 TPOT <= 3x the
decode step of one sequence at the mean context; attainment goal 90%.

Each workload's results.json holds `forecast` (the MILP's, from the plan), `simulated` (the
plan's simulation) and `measured` of the last round, each with `attainment` (0-1), `p90_ttft_s` and
`p90_tpot_s` at the plan's rate, and `goodput_rps`: the highest rate whose attainment meets
the goal (forecast: the plan's rate; simulated: the planner's bisection; measured: runs at
multiples of the plan's rate, interpolated at the goal). Every run at rate r replays what
the simulator runs at r (planner.evaluate.run_requests: the same requests, the same counted
window of arrivals), so measured and simulated differ by the serving, not by the sample.
`rounds` holds the same for each round ("alone": the profile taken alone; "served": refitted),
and `served_fit` how many steps the refit used and how much slower they ran than the profile.

    .venv/bin/python -m benchmarks.closed_loop [--out docs/bench/closed-loop] [--num-requests 300]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import markdown_table
from benchmarks.serving import InProcessServer, Request, percentile

WORKLOADS = {"poisson": 1.0, "bursty": 2.0}  # name -> CV of the arrival gaps
PROMPT = {"distribution": "lognormal", "median": 128, "sigma": 0.6, "max": 512}
OUTPUT = {"distribution": "uniform", "min": 16, "max": 64}
SLO_TTFT_PREFILLS, SLO_TPOT_STEPS = 4.0, 3.0  # the SLO in units of a lone request's steps
RATE_MULTIPLES = (0.75, 1.0, 1.25)  # measured runs, in units of the plan's rate
SEEDS_PER_RUN = 1_000_000  # run k's requests seed their prompts from k * this
_RUNS = itertools.count(1)  # measured runs in this process (the warm-up is run 0)
ROUNDS = ("alone", "served")  # planned with the profile taken alone, then refitted to what was served
KEYS = ("attainment", "p90_ttft_s", "p90_tpot_s", "goodput_rps")


class Progress:
    """Stage-by-stage progress on stdout, each line with the time since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stages: list[dict] = []  # what ran, for run.json

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.0f} s] {message}", flush=True)

    def stage(self, name: str, message: str) -> None:
        self.stages.append({"stage": name, "at_s": round(time.monotonic() - self.start, 1)})
        self.say(f"{name}: {message}")


def profile_core(model: Path, out: Path, args, progress: Progress):
    """`tandem profile` on one core; its (cpu, tp 1) coefficients."""
    from deploy.cli import main as tandem
    from planner.latency.roofline import Profile

    argv = [
        "profile",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--cores",
        "1",
        "--out",
        str(out),
        "--repeats",
        str(args.profile_repeats),
        "--prefill-tokens",
        "16,32,64,128,256,512",
        "--decode-batches",
        "1,2,4,8,16,32",
        "--decode-contexts",
        "64,256",
    ]
    progress.stage("profile", "tandem " + " ".join(argv))
    if tandem(argv) != 0:
        raise RuntimeError("tandem profile failed (its error is above)")
    return Profile.load(out).find("cpu", 1, 1)


def slo_for(coeffs, prompt_p90: int, mean_context: float) -> dict:
    """The SLO in units of a lone request (see the module docstring), as slo.yaml holds it."""
    return {
        "ttft_s": round(SLO_TTFT_PREFILLS * coeffs.prefill_ms(prompt_p90) / 1e3, 4),
        "tpot_s": round(SLO_TPOT_STEPS * coeffs.decode_ms(1, mean_context) / 1e3, 4),
        "ttft_percentile": 90,
        "tpot_percentile": 90,
        "attainment": 0.9,
    }


def cluster_for(model: Path, num_cores: int) -> dict:
    """One node whose devices are this machine's cores. Memory per core: the model's weights
    plus the KV the engine's CPU worker holds by default, so the plan's KV is the engine's."""
    from engine.llm_engine import CPU_KV_CACHE_BYTES
    from planner.latency.models import resolve_model
    from planner.solve.capacity import GPU_MEMORY_UTILIZATION

    weights = resolve_model(str(model)).weight_bytes
    memory_gb = (CPU_KV_CACHE_BYTES + weights) / GPU_MEMORY_UTILIZATION / 1e9
    return {
        "nodes": [
            {"name": "cores", "gpu_type": "cpu", "num_gpus": num_cores, "gpu_memory_gb": round(memory_gb + 0.001, 3)}
        ]
    }


def plan_workload(model: Path, files: dict[str, Path], out: Path, args, progress: Progress, name: str):
    from deploy.cli import main as tandem
    from proto.plan import Plan

    argv = [
        "plan",
        "--model",
        str(model),
        "--out",
        str(out),
        "--sim-requests",
        str(args.num_requests),
        "--calibrate-rounds",
        str(args.calibrate_rounds),
    ]
    for flag in ("cluster", "workload", "slo", "profile"):
        argv += [f"--{flag}", str(files[flag])]
    progress.stage(f"plan {name}", "tandem " + " ".join(argv))
    if tandem(argv) != 0:
        raise RuntimeError("tandem plan failed (its error is above)")
    return Plan.load(out)


def refit(steps: dict[str, list], base_file: Path, out: Path, progress: Progress, name: str) -> dict:
    """served-profile.yaml: the profile refitted to the steps served (prefill coefficients from
    the prefill workers' steps, decode ones from the decode workers'); returns what the fit used."""
    from planner.latency.profile import describe_refit, neighbour_overlap, refit_profile
    from planner.latency.roofline import Profile

    served, report = refit_profile(Profile.load(base_file), steps["prefill"], steps["decode"])
    served.save(out)
    coeffs = served.entries[0].coefficients
    progress.stage(f"refit {name}", f"{describe_refit(report, coeffs)} -> {out}")
    # The two workers share the machine's memory bandwidth and caches: how long their steps
    # ran while the other one computed, against steps of the same size while it was idle.
    only = {"prefill": lambda s: s.num_decodes == 0, "decode": lambda s: s.prefill_tokens == 0}
    other = {"prefill": "decode", "decode": "prefill"}
    report["neighbour"] = {
        role: neighbour_overlap([s for s in steps[role] if only[role](s)], steps[other[role]])
        for role in ("prefill", "decode")
    }
    for role, found in report["neighbour"].items():
        if found["beside_over_alone"] is not None:
            progress.say(
                f"  {role} steps ran {found['beside_over_alone']:.2f}x as long while the other worker computed "
                f"as steps of the same size while it was idle ({found['sizes_compared']} sizes; "
                f"{found['beside_steps']} and {found['alone_steps']} steps)"
            )
    return report


def save_steps(steps: dict[str, list], path: Path) -> None:
    """The steps served, as POST /admin/steps answers them (each role's workers merged), so
    that `tandem profile --from-steps` refits from them and anyone can look into them."""
    from dataclasses import astuple, fields

    from proto.serving import StepRecord

    workers = [
        {"role": role, "index": 0, "steps": [[round(x, 3) for x in astuple(s)] for s in rows]}
        for role, rows in steps.items()
    ]
    path.write_text(json.dumps({"fields": [f.name for f in fields(StepRecord)], "workers": workers}) + "\n")


def serve_plan(plan_file: Path, model: Path, max_model_len: int, progress: Progress) -> InProcessServer:
    """`tandem serve --plan`: the plan's workers (a core each) behind the router, in this process."""
    argv = [
        "serve",
        "--plan",
        str(plan_file),
        "--model",
        str(model),
        "--model-name",
        "bench",
        "--kv-backend",
        "shm",
        "--cpus-per-worker",
        "1",
        "--local-prefill-tokens",
        "0",
        "--max-model-len",
        str(max_model_len),
    ]
    progress.stage(f"serve {_round_name(plan_file)}", "tandem " + " ".join(argv))
    return InProcessServer(argv, log=lambda line: progress.say("  " + line))


def _round_name(plan_file: Path) -> str:
    """<workload>/plan.yaml -> "poisson"; <workload>/served/plan.yaml -> "poisson served"."""
    if plan_file.parent.name == "served":
        return f"{plan_file.parent.parent.name} served"
    return plan_file.parent.name


def measure(
    server: InProcessServer,
    plan,
    spec,
    rate: float,
    num_requests: int,
    steps: dict[str, list],
    record: Path | None = None,
) -> dict:
    """One run at `rate`: the simulator's requests and counted window at that rate. The
    steps the workers ran for it are added to `steps`, by role; `record`, if given, gets
    every request's figures, so that a run can be held against the simulator request by
    request (the simulator replays the same requests: planner.evaluate.run_requests)."""
    from planner.evaluate import run_requests
    from planner.problem import workload_stats

    sample, (start_s, end_s) = run_requests(
        spec, None, workload_stats(spec, None), plan.slo, rate, num_requests, seed=0
    )
    requests = [
        Request(float(a), int(p), int(o))
        for a, p, o in zip(sample.arrival_s, sample.input_tokens, sample.output_tokens, strict=True)
    ]
    # Prompts of their own (the same lengths): a run finds none of an earlier run's prompts
    # in the workers' prefix caches, which the simulator does not model.
    results, duration_s = server.load(requests, seed_base=next(_RUNS) * SEEDS_PER_RUN)
    for role, taken in server.take_steps().items():
        steps.setdefault(role, []).extend(taken)
    counted = [r for q, r in zip(requests, results, strict=True) if start_s <= q.arrival_s <= end_s]
    if record is not None:
        fields_ = ["arrival_s", "prompt_tokens", "output_tokens", "counted", "ttft_s", "tpot_s", "handoff_s"]
        rows = [
            [q.arrival_s, q.prompt_len, q.output_len, start_s <= q.arrival_s <= end_s, r.ttft_s, r.tpot_s, r.handoff_s]
            for q, r in zip(requests, results, strict=True)
        ]
        record.write_text(json.dumps({"rate_rps": rate, "fields": fields_, "requests": rows}) + "\n")
    ok = [(r.ttft_s, r.tpot_s) for r in counted if r.ttft_s is not None and r.tpot_s is not None]
    good = [1 for ttft, tpot in ok if ttft <= plan.slo.ttft_s and tpot <= plan.slo.tpot_s]
    handoffs = [r.handoff_s for r in counted if r.handoff_s is not None]
    return {
        "rate_rps": round(rate, 4),
        "requests": len(requests),
        "counted": len(counted),
        "failed": len(counted) - len(ok),
        "attainment": len(good) / max(len(counted), 1),
        "p90_ttft_s": percentile([ttft for ttft, _ in ok], 90),
        "p90_tpot_s": percentile([tpot for _, tpot in ok], 90),
        # TPOT's first gap: the prefill -> decode hand-off (KV transfer, admission, a step)
        "p50_handoff_s": percentile(handoffs, 50),
        "p90_handoff_s": percentile(handoffs, 90),
        "duration_s": round(duration_s, 1),
    }


def goodput(points: list[tuple[float, float]], goal: float) -> float:
    """The highest rate whose attainment meets goal, interpolated between measured rates
    (attainment taken as 1 at rate 0), as DistServe reads goodput off a sweep."""
    best = 0.0
    for (r0, a0), (r1, a1) in pairwise([(0.0, 1.0)] + sorted(points)):
        if a1 >= goal:
            best = r1
        elif a0 >= goal:
            return r0 + (r1 - r0) * (a0 - goal) / (a0 - a1)
    return best


def sweep(
    server: InProcessServer, plan, spec, args, progress: Progress, name: str, steps: dict[str, list], rdir: Path
) -> list[dict]:
    """Runs at the multiples of the plan's rate, then (at most args.extra_rates) beyond the
    highest while every run meets the goal, or below the lowest while none does. Each run's
    requests go to rdir/requests-<multiple>x.json."""
    rate = plan.predicted.rate_rps
    multiples = list(args.rate_multiples)
    runs: list[dict] = []
    for _ in range(args.extra_rates + 1):
        for m in multiples:
            r = measure(server, plan, spec, m * rate, args.num_requests, steps, rdir / f"requests-{m:g}x.json")
            runs.append(r)
            progress.say(
                f"  {name} at {r['rate_rps']:.2f} req/s ({m:g}x the plan's): attainment "
                f"{r['attainment']:.3f}, P90 TTFT {r['p90_ttft_s']:.3f} s, P90 TPOT "
                f"{r['p90_tpot_s'] * 1e3:.1f} ms, {r['failed']} failed of {r['counted']} counted "
                f"({r['duration_s']:.0f} s)"
            )
        met = [r["attainment"] >= plan.slo.attainment for r in runs]
        ran = [r["rate_rps"] / rate for r in runs]
        if all(met):
            multiples = [round(max(ran) * 1.25, 4)]
        elif not any(met):
            multiples = [round(min(ran) * 0.75, 4)]
        else:
            break
    return sorted(runs, key=lambda r: r["rate_rps"])


def results_for(plan, runs: list[dict]) -> dict:
    """results.json: forecast, simulated and measured at the plan's rate, and their goodputs."""
    at_plan = min(runs, key=lambda x: abs(x["rate_rps"] - plan.predicted.rate_rps))
    measured_goodput = goodput([(x["rate_rps"], x["attainment"]) for x in runs], plan.slo.attainment)

    def figures(m, goodput_rps):
        return {"attainment": m.attainment, "p90_ttft_s": m.ttft_s, "p90_tpot_s": m.tpot_s, "goodput_rps": goodput_rps}

    return {
        "forecast": figures(plan.predicted, plan.predicted.goodput_rps),
        "simulated": figures(plan.simulated, plan.simulated.goodput_rps),
        "measured": {
            "attainment": round(at_plan["attainment"], 4),
            "p90_ttft_s": round(at_plan["p90_ttft_s"], 4),
            "p90_tpot_s": round(at_plan["p90_tpot_s"], 4),
            "goodput_rps": round(measured_goodput, 4),
        },
    }


def table(all_results: dict[str, dict], rates: dict[str, float]) -> str:
    rows = []
    for name, res in all_results.items():
        f, s, m = res["forecast"], res["simulated"], res["measured"]
        rows += [
            [
                name,
                f"SLO attainment at {rates[name]:.2f} req/s",
                f"{f['attainment']:.3f}",
                f"{s['attainment']:.3f}",
                f"{m['attainment']:.3f}",
            ],
            ["", "P90 TTFT (s)"] + [f"{x['p90_ttft_s']:.3f}" for x in (f, s, m)],
            ["", "P90 TPOT (ms)"] + [f"{x['p90_tpot_s'] * 1e3:.1f}" for x in (f, s, m)],
            ["", "goodput (req/s)"] + [f"{x['goodput_rps']:.2f}" for x in (f, s, m)],
        ]
    lines = [markdown_table(["workload (round)", "", "MILP forecast", "simulator", "measured"], rows), ""]
    for name, res in all_results.items():
        f, s, m = res["forecast"], res["simulated"], res["measured"]
        lines.append(
            f"- {name}: simulator - measured attainment {100 * (s['attainment'] - m['attainment']):+.1f} "
            f"points (target within 5), goodput {_gap(s['goodput_rps'], m['goodput_rps'])} of measured "
            f"(target within 10%); forecast goodput {_gap(f['goodput_rps'], s['goodput_rps'])} of the "
            f"simulator's (target within 10%)"
        )
    return "\n".join(lines)


def _gap(x: float, ref: float) -> str:
    return f"{100 * (x - ref) / ref:+.1f}%" if ref > 0 else "n/a"


def plot(all_results: dict[str, dict], slo: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = ("forecast", "simulated", "measured")
    titles = {
        "attainment": "SLO attainment at the plan's rate",
        "p90_ttft_s": "P90 TTFT (s)",
        "p90_tpot_s": "P90 TPOT (ms)",
        "goodput_rps": "goodput (req/s)",
    }
    lines = {"attainment": slo["attainment"], "p90_ttft_s": slo["ttft_s"], "p90_tpot_s": slo["tpot_s"] * 1e3}
    fig, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.6))
    x = np.arange(len(all_results))
    for ax, key in zip(axes, KEYS, strict=True):
        for k, source in enumerate(sources):
            values = [res[source][key] * (1e3 if key == "p90_tpot_s" else 1) for res in all_results.values()]
            ax.bar(x + (k - 1) * 0.27, values, 0.27, label=source)
        if key in lines:
            ax.axhline(lines[key], color="grey", ls="--", lw=1)
        ax.set_xticks(x, list(all_results))
        ax.set_title(titles[key])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> dict:
    from engine.cores import available_cores
    from planner.simulate.workload import WorkloadSpec

    progress = Progress()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from benchmarks.distserve import model_dir

        model = model_dir()
    num_cores = len(available_cores())
    progress.say(f"model {model}, {num_cores} cores, load average {os.getloadavg()[0]:.2f}")
    coeffs = profile_core(model, out / "profile.yaml", args, progress)
    prompt = {**PROMPT, "max": args.max_prompt}
    lengths = WorkloadSpec.from_dict({"rate_rps": 1.0, "input_tokens": prompt, "output_tokens": OUTPUT})
    sample = lengths.sample(4000, seed=0)
    prompt_p90 = int(np.percentile(sample.input_tokens, 90))
    slo = slo_for(coeffs, prompt_p90, float(np.mean(sample.input_tokens + sample.output_tokens / 2)))
    files = {"profile": out / "profile.yaml", "cluster": out / "cluster.yaml", "slo": out / "slo.yaml"}
    files["cluster"].write_text(yaml.safe_dump(cluster_for(model, num_cores), sort_keys=False))
    files["slo"].write_text(yaml.safe_dump(slo, sort_keys=False))
    progress.say(
        f"SLO: P90 TTFT <= {slo['ttft_s']:.3f} s ({SLO_TTFT_PREFILLS:g}x the prefill of a {prompt_p90}-token "
        f"prompt), P90 TPOT <= {slo['tpot_s'] * 1e3:.1f} ms ({SLO_TPOT_STEPS:g}x a decode step alone)"
    )
    all_results, rates, sweeps, fits = {}, {}, {}, {}
    max_model_len = args.max_prompt + OUTPUT["max"] + 16
    for name in args.workloads:
        wdir = out / name
        wdir.mkdir(exist_ok=True)
        # The plan finds the rate it serves (objective goodput); the replay runs at that rate.
        data = {"rate_rps": 1.0, "cv": WORKLOADS[name], "input_tokens": prompt, "output_tokens": OUTPUT}
        (wdir / "workload.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        spec = WorkloadSpec.load(wdir / "workload.yaml")
        rounds = {}
        profile_file = files["profile"]
        for k, round_name in enumerate(ROUNDS[: args.rounds]):
            rdir = wdir if round_name == "alone" else wdir / round_name
            rdir.mkdir(exist_ok=True)
            label = name if round_name == "alone" else f"{name} {round_name}"
            plan = plan_workload(
                model, {**files, "profile": profile_file, "workload": wdir / "workload.yaml"},
                rdir / "plan.yaml", args, progress, label,
            )  # fmt: skip
            server = serve_plan(rdir / "plan.yaml", model, max_model_len, progress)
            steps: dict[str, list] = {}
            try:
                progress.stage(
                    f"bench {label}",
                    f"warm-up, then {args.num_requests} requests or more per rate, at "
                    f"{', '.join(f'{m:g}' for m in args.rate_multiples)}x the plan's "
                    f"{plan.predicted.rate_rps:.2f} req/s",
                )
                server.load([Request(0.2 * i, 64, 8) for i in range(4)])  # first forwards pay one-time costs
                server.take_steps()  # the warm-up's steps are not served load
                sweeps[label] = sweep(server, plan, spec, args, progress, label, steps, rdir)
            finally:
                server.stop()
            save_steps(steps, rdir / "steps.json")
            rounds[round_name] = results_for(plan, sweeps[label])
            all_results[label] = rounds[round_name]
            rates[label] = plan.predicted.rate_rps
            if k + 1 < args.rounds:  # the next round plans with what this one served
                profile_file = wdir / "served-profile.yaml"
                fits[name] = refit(steps, files["profile"], profile_file, progress, name)
        results = {**rounds[ROUNDS[args.rounds - 1]], "rounds": rounds}
        if name in fits:
            results["served_fit"] = fits[name]
        (wdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(all_results, rates)
    (out / "table.md").write_text(text + "\n")
    plot(all_results, slo, out / "plot.png")
    run_info = {
        "model": str(model),
        "cores": num_cores,
        "slo": slo,
        "num_requests": args.num_requests,
        "load_avg_end": os.getloadavg()[0],
        "elapsed_s": round(time.monotonic() - progress.start, 1),
        "stages": progress.stages,
        "sweeps": sweeps,
        "served_fits": fits,
    }
    (out / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    print("\n" + text, flush=True)
    progress.say(f"wrote {out}/table.md, plot.png, run.json and <workload>/results.json")
    return all_results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench/closed-loop"))
    parser.add_argument(
        "--model",
        type=Path,
        help="checkpoint directory (default: the ~100M Llama of benchmarks/distserve.py, built on first use)",
    )
    parser.add_argument(
        "--workloads",
        type=lambda s: s.split(","),
        default=list(WORKLOADS),
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default both)",
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        default=300,
        help="requests per simulation and per measured run, at least (default 300)",
    )
    parser.add_argument(
        "--rate-multiples",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=RATE_MULTIPLES,
        help="measured runs at these multiples of the plan's rate",
    )
    parser.add_argument(
        "--max-prompt",
        type=int,
        default=PROMPT["max"],
        help=f"longest prompt in tokens (default {PROMPT['max']}; the model's context window "
        f"must hold it and {OUTPUT['max']} output tokens)",
    )
    parser.add_argument(
        "--extra-rates",
        type=int,
        default=2,
        help="measured runs added, at most, beyond the multiples until the goal is bracketed",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: plan with the profile taken alone; 2 (default): then refit it to the steps served, "
        "plan, serve and measure again",
    )
    parser.add_argument("--calibrate-rounds", type=int, default=3, help="tandem plan --calibrate-rounds")
    parser.add_argument("--profile-repeats", type=int, default=3, help="tandem profile --repeats")
    args = parser.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    run(args)


if __name__ == "__main__":
    main()
