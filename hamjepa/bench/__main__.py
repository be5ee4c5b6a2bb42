"""Dispatch `python -m hamjepa.bench <name> [options]` to hamjepa.bench.<name>.main(argv)."""

import importlib
import sys

BENCHMARKS = {
    "predictor": "leapfrog predictor forward+backward: closed-form grad V vs autograd double backward",
    "augment": "two-view augmentation throughput (images/s) through the training DataLoader",
    "step": "time per training step, HamJEPA vs SIGReg; images/s and data wait, augmentation on device vs loader",
    "gpu": "the one check to run on a CUDA machine: NCCL, bf16 steps, on-device augmentation, data wait; JSON + table",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        listing = "\n".join(f"  {name:10s} {what}" for name, what in BENCHMARKS.items())
        sys.exit(f"usage: python -m hamjepa.bench <name> [options]\n{listing}")
    importlib.import_module(f"hamjepa.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
