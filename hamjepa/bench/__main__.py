"""Dispatch `python -m hamjepa.bench <name> [options]` to hamjepa.bench.<name>.main(argv)."""

import importlib
import sys

BENCHMARKS = {
    "predictor": "leapfrog predictor forward+backward: closed-form grad V vs autograd double backward",
    "augment": "two-view augmentation throughput (images/s) through the training DataLoader",
    "step": "time per training step, HamJEPA vs SIGReg; images/s and data wait, augmentation on device vs loader",
    "gpu": "the one check to run on a CUDA machine: NCCL, bf16 steps, on-device augmentation, data wait; JSON + table",
}


USAGE = "usage: python -m hamjepa.bench <name> [options]   (<name> --help: that benchmark's options)"


def listing() -> str:
    return "\n".join([USAGE, "benchmarks:", *(f"  {name:10s} {what}" for name, what in BENCHMARKS.items())])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):  # asked for: the list, exit 0
        print(listing())
        return
    if not argv or argv[0] not in BENCHMARKS:
        sys.exit(listing())  # a missing or unknown name: the same list on stderr, exit 1
    importlib.import_module(f"hamjepa.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
