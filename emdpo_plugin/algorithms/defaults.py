"""Optimistic Hedge defaults (`minmax.optimistic_hedge`), shared by the minmax stage, `openrlhf export`
and its CLI options. A module of its own so the CLI can show them without importing numpy and scipy."""

HEDGE_ETA = 0.05  # step size
HEDGE_STEPS = 10_000  # iterations
