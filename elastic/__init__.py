"""Workers whose role changes while they serve (online P:D rebalancing, router/rebalance.py)."""
