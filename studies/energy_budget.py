"""Study: when does Hamiltonian prediction beat isotropic regularisation? Leapfrog horizon, step size,
spectral floor and energy budget of HamJEPA, searched by Optuna, against SIGReg baselines.

    python studies/energy_budget.py                  # quick profile: Fashion-MNIST, 2 CPU cores
    python studies/energy_budget.py --profile cifar100 --address auto --storage-path s3://bucket/studies
"""

import sys

from ray import tune

from hamjepa.cli import study_main

# Dotted config keys -> distributions. The paper's defaults are evaluated first.
SEARCH_SPACE = {
    "predictor.steps": tune.randint(1, 5),  # leapfrog steps K in 1..4
    "predictor.dt": tune.loguniform(0.01, 0.2),  # leapfrog step size
    "hamjepa_loss.logdet_floor": tune.uniform(-3.0, -0.5),  # spectral floor tau on logdet(C)/k
    "hamjepa_loss.pr_floor_q": tune.uniform(0.04, 0.3),  # participation-ratio floor r0 of q
    "hamjepa_loss.pr_floor_p": tune.uniform(0.04, 0.3),  # participation-ratio floor r0 of p
    "hamjepa_loss.q_target": tune.loguniform(0.25, 4.0),  # energy budget target of E|q|^2/d
    "hamjepa_loss.p_target": tune.loguniform(0.25, 4.0),  # energy budget target of E|p|^2/d
    "hamjepa_loss.w_budget": tune.loguniform(0.02, 2.0),  # energy budget weight
}

if __name__ == "__main__":
    sys.exit(study_main("energy_budget", SEARCH_SPACE))
