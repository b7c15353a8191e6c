"""PolicyBackend implementations: `bandit` (torch MLP) and `openrlhf` (causal LMs)."""
