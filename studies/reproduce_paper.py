"""The paper's CIFAR-100 comparison as fixed runs, not a search: SIGReg, HamJEPA (q, p and qp readouts) and
MLP-HJEPA, 3 seeds each, 30 epochs, ending in the paper's table with its own numbers beside ours.

    python studies/reproduce_paper.py --address auto --storage-path s3://bucket/studies   # on a GPU cluster
    python studies/reproduce_paper.py --epochs 80 ...                                       # the longer schedule
    python studies/reproduce_paper.py --profile quick                                       # small, on a laptop
"""

import sys

from hamjepa.cli import reproduce_main

if __name__ == "__main__":
    sys.exit(reproduce_main())
