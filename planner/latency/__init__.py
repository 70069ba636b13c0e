"""What a step costs: GPU and model specs, the roofline, measured profiles, `tandem plan latency`.

The bottom layer of the planner: it knows nothing of placements, queues or SLOs.
"""
