"""Solving a PuLP model with HiGHS (or CBC when highspy is missing) and reporting honestly.

PuLP's status says "Optimal" also after a time limit with a feasible solution; what
the planner records is whether optimality was proven, and the proven relative gap
(|best bound - incumbent| / |incumbent|) read from the solver itself.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proto.plan import SolverInfo

SOLVERS = ("auto", "highs", "cbc")
PROGRESS_INTERVAL_S = 2.0


@dataclass(frozen=True)
class SolveOptions:
    time_limit_s: float = 60.0
    gap_rel: float = 0.005  # stop once the proven gap is below this (0.5%)
    threads: int = 2
    solver: str = "auto"  # one of SOLVERS

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {self.solver!r}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time limit must be positive, got {self.time_limit_s}")


def highs_available() -> bool:
    import pulp

    return pulp.HiGHS().available()


def solve(problem, options: SolveOptions, progress: Callable[[str], None] | None = None) -> SolverInfo:
    """Solve problem in place (variables get values); returns what the solver proved."""
    use_highs = options.solver == "highs" or (options.solver == "auto" and highs_available())
    if options.solver == "highs" and not highs_available():
        raise ValueError("solver 'highs' needs the highspy package; install it or pass --solver cbc")
    start = time.perf_counter()
    if use_highs:
        status, gap = _solve_highs(problem, options, progress)
        name = "HiGHS"
    else:
        status, gap = _solve_cbc(problem, options)
        name = "CBC"
    elapsed = time.perf_counter() - start
    import pulp

    objective = pulp.value(problem.objective) if status in ("optimal", "time_limit") else 0.0
    return SolverInfo(
        name=name,
        status=status,
        gap=gap,
        solve_time_s=round(elapsed, 3),
        objective=float(objective or 0.0),
        num_variables=problem.numVariables(),
        num_constraints=problem.numConstraints(),
    )


def _solve_highs(problem, options: SolveOptions, progress) -> tuple[str, float]:
    import highspy
    import pulp

    last = [0.0]

    def report(_type, _message, data, _data_in, _user):
        if data.running_time - last[0] >= PROGRESS_INTERVAL_S and abs(data.mip_primal_bound) < 1e30:
            last[0] = data.running_time
            progress(
                f"  {data.running_time:5.1f} s  incumbent {abs(data.mip_primal_bound):.4g}  "
                f"bound {abs(data.mip_dual_bound):.4g}  gap {data.mip_gap:.2%}"
            )

    cb = highspy.cb.HighsCallbackType
    solver = pulp.HiGHS(
        msg=False,
        timeLimit=options.time_limit_s,
        gapRel=options.gap_rel,
        threads=options.threads,
        callbackTuple=(report, None) if progress else None,
        callbacksToActivate=[cb.kCallbackMipInterrupt] if progress else None,
    )
    problem.solve(solver)
    model_status = problem.solverModel.getModelStatus()
    if problem.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return _no_solution(problem), float("inf")
    gap = float(problem.solverModel.getInfo().mip_gap)
    if not problem.isMIP():
        gap = 0.0
    proven = model_status == highspy.HighsModelStatus.kOptimal
    return ("optimal" if proven else "time_limit"), max(gap, 0.0)


def _solve_cbc(problem, options: SolveOptions) -> tuple[str, float]:
    import pulp

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "cbc.log"
        solver = pulp.PULP_CBC_CMD(
            msg=False, timeLimit=options.time_limit_s, gapRel=options.gap_rel, threads=options.threads, logPath=str(log)
        )
        problem.solve(solver)
        text = log.read_text() if log.exists() else ""
    if problem.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return _no_solution(problem), float("inf")
    match = re.search(r"^Gap:\s+([-\d.e+]+)", text, re.MULTILINE)
    proven = "Optimal solution found" in text
    if match:
        return ("optimal" if proven else "time_limit"), abs(float(match.group(1)))
    # CBC prints no gap when it closes the search; within gapRel is all it promises then.
    return ("optimal", options.gap_rel) if proven else ("time_limit", float("inf"))


def _no_solution(problem) -> str:
    import pulp

    return "infeasible" if problem.sol_status == pulp.LpSolutionInfeasible else "no_solution"
