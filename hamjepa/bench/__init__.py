"""Benchmarks: `python -m hamjepa.bench <name>`; each prints ratios measured side by side in one run."""
