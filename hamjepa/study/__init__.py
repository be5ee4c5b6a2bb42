"""A study: Ray Tune + Optuna over HamJEPA configurations, SIGReg baselines, all logged to MLflow.

Phases, each a Tune experiment under <storage>/<study>/<invocation id>/<phase>:
1. search    HamJEPA trials proposed by Optuna (TPE, seeded, the paper's defaults first), early-stopped
             by ASHA on `epoch` unless switched off, all on the base seed. Objective: val_knn{k}_top1
             (validation split). Optuna is told how each trial really ended (FullTrialOptunaSearch).
2. compare   one grid of arms x fresh seeds (never the search's seed): the selected configuration, SIGReg
             and optionally MLP-HJEPA (the selected configuration with the leapfrog replaced). Each seed
             gives every arm the same data split, sample order, augmentation stream and encoder
             initialisation, so the comparison is paired by seed. One grid, not a phase per arm, so the
             runs pack onto the workers (3 seeds x 2 arms on 2 cores: 3 rounds, not 4).
The selected search trial itself is never compared: it won on validation, which biases it upwards.

Every trial is a Tune function trainable (the "driver") that runs one Ray Train TorchTrainer named after
the trial, so a retried or resumed driver continues that run from its checkpoint. MLflow logging lives
in a Tune callback in this process: one parent run per invocation, one child run per trial, found again
by key on resume, never duplicated and never left RUNNING.

Modules: settings (what was asked), search (Optuna and ASHA), driver (one trial and its MLflow run), phases (one
Tune experiment), invocation (identity, resume, the parent run), runner (search then compare), reproduce (the
paper's fixed runs), reopen (a study rebuilt from MLflow alone).
"""
