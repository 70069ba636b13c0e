"""A placement under requests: workloads (distributions, traces, burstiness), the
discrete-event simulator running the engine's own scheduler, and the per-role calibration
of the capacity model against it.

Uses planner.latency and planner.solve.
"""
