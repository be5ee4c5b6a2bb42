"""Dispatch `python -m hamjepa.bench <name> [options]` to hamjepa.bench.<name>.main(argv).

A benchmark checks its flags before it measures anything, as the `hamjepa` command does: a bad flag (out of range,
not a number, an unknown or out-of-range --set) is a UserError, printed here as one line, exit code 2.
"""

import importlib
import sys

from hamjepa.errors import UserError
from hamjepa.redact import mask_text

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
    if not argv:
        sys.exit(listing())  # no name: the list on stderr, exit 1
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"python -m hamjepa.bench: error: there is no benchmark {name!r}; name one of "
              f"{', '.join(BENCHMARKS)}; see --help.", file=sys.stderr)
        sys.exit(2)
    try:
        importlib.import_module(f"hamjepa.bench.{name}").main(argv[1:])
    except UserError as error:  # a bad flag, refused before any measurement
        print(f"python -m hamjepa.bench {name}: error: {mask_text(str(error))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
