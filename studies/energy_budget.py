"""Study: when does Hamiltonian prediction beat isotropic regularisation? Leapfrog horizon, step size,
spectral floor and energy budget of HamJEPA, searched by Optuna, against SIGReg baselines.

The search space is data: energy_budget.yaml beside this file (or --space FILE, --search KEY=DIST, --freeze KEY).

    python studies/energy_budget.py                  # quick profile: Fashion-MNIST, 2 CPU cores
    python studies/energy_budget.py --profile cifar100 --address auto --storage-path s3://bucket/studies
    ray job submit --working-dir . -- python studies/energy_budget.py    # on a cluster: RAY_ADDRESS is used
"""

import sys
from pathlib import Path

from hamjepa.cli import study_main

SPACE_FILE = Path(__file__).with_suffix(".yaml")

if __name__ == "__main__":
    sys.exit(study_main("energy_budget", SPACE_FILE))
