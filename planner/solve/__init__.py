"""What an instance serves and where instances go: the queueing capacity model under the SLO,
KV traffic limits (max-flow), the placement MILP and its solver, exhaustive enumeration, the
Helix-style layer split, forecasts and the diagnoses of a cluster that cannot serve.

Uses planner.latency; knows nothing of the simulator.
"""
