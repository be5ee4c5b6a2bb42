"""One training run: the per-worker loop under Ray Train (loop), checkpoints, the optimiser and its schedule,
divergence, the workers' resources, launching and logging one run (launch), and the trained encoder's artifact."""
