"""argparse whose refusals are one line, like every other bad input: `<prog>: error: <sentence>; see --help.`,
exit code 2 (argparse's own prints the usage first, two or more lines). Every command line of the project uses
it: `hamjepa`, the study scripts, the benchmarks, cluster/mlflow_store.py.
"""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line, `<prog>: error: <sentence>; see --help.` (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see --help.\n")
