"""Evaluation of a frozen encoder: features, kNN and the linear probe (probes), what a run reports from them
(readouts), and the theory check on the probe's geometry and the learned flow (theory)."""
