"""What a study invocation is asked to do, validated before Ray starts: its settings, the parameters it records as
started with (which a resumed invocation must match), the search's first point, and the compare phase's cells (arms
x paired seeds) with their stable keys. (The search space: study/space.py.)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hamjepa import names
from hamjepa.config import Config, ConfigError
from hamjepa.errors import UserError
from hamjepa.methods import ABLATIONS, BASELINE, Method
from hamjepa.redact import mask_uri
from hamjepa.study.space import SearchSpace
from hamjepa.train.resources import Resources


@dataclass(frozen=True)
class StudySettings:
    """Everything a study invocation needs besides its search space; validated before Ray starts."""

    name: str
    base: Config
    num_samples: int = 6
    seeds: int = 3  # paired seeds per side: the selected HamJEPA configuration and SIGReg on each (sequential: most)
    sequential: bool = False  # --seeds auto[:MAX]: seeds added in looks until the primary is resolved
    ablation: str = ""  # "" or one of methods.ABLATIONS
    early_stopping: bool = True
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int = 0  # 0 = as many trials as the cluster's resources allow
    tracking_uri: str = ""
    experiment: str = ""
    storage_path: str = ""  # "" = $HAMJEPA_STORAGE_PATH or ./ray_results
    seed: int = 0  # Optuna's sampler seed
    resume: str = ""  # "" = a new study; "latest" = this study's latest invocation; else a study id
    verbose: bool = False  # Ray's own console output (workers' logs, Tune's full tables) instead of ours
    searches: bool = True  # False for fixed runs (reproduce_paper): no objective, so no validation split needed
    primary: str = ""  # the primary metric, declared before the study ("" = names.default_primary)
    tune_baseline: bool = False  # SIGReg gets its own search, with the same budget, scheduler and selection rule
    reference: int = 10  # encoders evaluated at initialisation, the yardstick of "learned" (0 = none)
    objective: str = ""  # the metric the search selects on ("" = validation kNN@k, names.objective)
    optuna_storage: str = ""  # the live Optuna study's RDB URL ("" = optuna.db in the study's folder)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise UserError(f"--num-samples = {self.num_samples} is invalid: must be an integer >= 1.")
        if self.seeds < 0:
            raise UserError(f"--seeds = {self.seeds} is invalid: must be an integer >= 0 (0 = search only).")
        if self.sequential and self.seeds < 2:
            raise UserError(f"--seeds = auto:{self.seeds} is invalid: a sequential study needs at most >= 2 seeds.")
        if self.ablation not in ("", *ABLATIONS):
            raise UserError(f"--ablation = {self.ablation!r} is invalid: must be one of {', '.join(ABLATIONS)}.")
        if self.max_concurrent < 0:
            raise UserError(f"--max-concurrent = {self.max_concurrent} is invalid: must be >= 0 (0 = automatic).")
        if self.searches and self.base.data.val_size <= 0:
            raise ConfigError("config field 'data.val_size' = 0 is invalid for a study: the objective is measured on "
                              "the validation split, so it needs images (default 5000).")
        if self.reference < 0 or self.reference == 1:
            raise UserError(f"--reference = {self.reference} is invalid: must be 0 (no initialisation reference) or "
                            ">= 2 (a spread to test against; default 10).")
        choices = names.primary_choices(self.base.eval.knn_k)
        if self.primary and self.primary not in choices:
            raise UserError(f"--primary = {self.primary!r} is invalid: must be one of {', '.join(choices)} (a test "
                            "row; the validation split is the one the search selects on).")
        self._check_objective()
        self.resources.check_batch(self.base)

    def _check_objective(self) -> None:
        k = self.base.eval.knn_k
        object.__setattr__(self, "objective", self.objective or names.objective(k))  # frozen: resolved once, here
        choices = names.objective_choices(k)
        if self.objective not in choices:
            raise UserError(f"--objective = {self.objective!r} is invalid: must be one of {', '.join(choices)} (a "
                            "validation metric: the test split only judges).")
        if self.searches and self.early_stopping and not names.every_epoch(self.objective, k):
            raise UserError(f"--objective = {self.objective} is measured once, after the last epoch, so ASHA cannot "
                            "stop trials on it; add --no-early-stopping.")

    @property
    def experiment_name(self) -> str:
        return self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"hamjepa-{self.name}"

    @property
    def primary_metric(self) -> str:
        return self.primary or names.default_primary(self.base.eval.knn_k)

    @property
    def tuning(self) -> str:
        return tuning_statement(self.num_samples, self.tune_baseline)

    def baseline(self) -> StudySettings:
        """The settings of the baseline's search: the same study, training SIGReg."""
        return dataclasses.replace(self, base=self.base.override({"method": BASELINE.value}))

    @property
    def looks(self) -> tuple[int, ...]:
        """The paired seeds at each look: all of them at once, or the sequential schedule."""
        from hamjepa.report.sequential import looks

        return looks(self.seeds) if self.sequential else (self.seeds,)

    @property
    def paired_seeds(self) -> list[int]:
        """Fresh seeds for the paired comparison: never the base seed, which every search trial used."""
        return [self.base.seed + 1 + i for i in range(self.seeds)]


# -- what a search study records as started with (a resumed one must match it, before Ray starts) ----------------

def search_params(settings: StudySettings, space: SearchSpace) -> dict[str, Any]:
    """A search study's own parameters (`space`: its SearchSpace): the protocol its flags set, logged on its parent
    run and stored in study.json, so `--resume` with another --seeds, --space, --objective, ... is refused."""
    return {"study.num_samples": settings.num_samples, "study.seeds": settings.seeds,
            "study.paired_seeds": ",".join(map(str, settings.paired_seeds)),
            "study.early_stopping": settings.early_stopping, "study.seed": settings.seed,
            "study.search_keys": ",".join(space), "study.search_space": space.text(),
            "study.objective": settings.objective, "study.ablation": settings.ablation,
            "study.primary": settings.primary_metric, "study.tune_baseline": settings.tune_baseline,
            "study.sequential": settings.sequential, "study.reference": settings.reference,
            "study.optuna_storage": mask_uri(settings.optuna_storage)}


# The flag behind each study parameter, named when a resumed command changes it.
STUDY_FLAGS = {
    "study.num_samples": "--num-samples", "study.seeds": "--seeds", "study.sequential": "--seeds auto",
    "study.paired_seeds": "the paired seeds (--seeds, seed)", "study.early_stopping": "--no-early-stopping",
    "study.seed": "--seed", "study.search_keys": "the searched keys (--space, --search, --freeze)",
    "study.search_space": "the search space (--space, --search, --freeze)", "study.objective": "--objective",
    "study.ablation": "--ablation", "study.primary": "--primary", "study.tune_baseline": "--tune-baseline",
    "study.reference": "--reference", "study.optuna_storage": "--optuna-storage", "study.workers": "--workers",
    "study.methods": "the methods reproduced",
}


def tuning_statement(trials: int | str, baseline_tuned: bool = False) -> str:
    """How each method was tuned, stated before any number."""
    if baseline_tuned:
        return (f"Tuning: HamJEPA and SIGReg each tuned over {trials} Optuna trials (TPE, the same scheduler, each "
                "selected on the validation split).")
    return (f"Tuning: HamJEPA tuned over {trials} Optuna trials (selected on the validation split); SIGReg at its "
            "defaults, untuned: an asymmetry in HamJEPA's favour (--tune-baseline tunes it alike).")


# -- the search's first point (spaces themselves: study/space.py) -------------------------------------

def defaults_point(space: Mapping[str, Any], base: Config) -> dict[str, Any]:
    """The base config's values of the searched keys: Optuna evaluates the paper's defaults first."""
    flat = base.flatten()
    return {key: flat[key] for key in space}


# A compare-phase trial's config: {"cell": {"arm": {overrides of one arm}, "seed": s}}. One grid over
# cells (not arms x seeds), so a resumed study can run exactly the cells that have not ended.
CELL, ARM = "cell", "arm"


def flat_overrides(trial_config: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune trial's config as dotted config overrides (a compare cell's arm and seed lifted to the top)."""
    cell = trial_config.get(CELL)
    if cell is None:  # a search trial: on the base seed, whose initialisation every trial shares
        return {"eval.initial_readouts": False, **trial_config}
    rest = {k: v for k, v in trial_config.items() if k != CELL}
    # Nothing selects on a compared run: its objective is measured at initialisation and at the end only.
    return {**cell[ARM], "seed": cell["seed"], "eval.objective_every_epoch": False, **rest}


def config_of_trial(base: Config, tune_config: Mapping[str, Any]) -> Config:
    """The config a Tune trial trains: the study's base with the trial's overrides (validated by Config).

    The trial's driver and the MLflow callback each derive it from the same two values, so they agree.
    """
    return base.override(flat_overrides(tune_config))


def cell_key(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def run_key(trial_config: Mapping[str, Any], trial_id: str) -> str:
    """A trial's stable name: a cell's method and seed (the same in every invocation that runs it, so a
    resumed cell continues its checkpoint and its MLflow run), else Tune's trial id."""
    cell = trial_config.get(CELL)
    return cell_key(cell[ARM]["method"], cell["seed"]) if cell else trial_id


def comparison_cells(settings: StudySettings, selected: Mapping[str, Any] | None,
                     baseline: Mapping[str, Any] | None = None, seeds: int | None = None) -> list[dict[str, Any]]:
    """The compare phase's runs: every arm on every paired seed (the first `seeds` of them), seed by seed (an
    interrupted comparison has whole pairs first)."""
    arms = [{**(baseline or {}), "method": BASELINE.value}]  # SIGReg's selected configuration, or its defaults
    if selected is not None:
        arms.insert(0, {**selected, "method": Method.HAMJEPA.value})
        if settings.ablation:
            arms.append({**selected, "method": settings.ablation})
    return [{ARM: arm, "seed": seed} for seed in settings.paired_seeds[:seeds] for arm in arms]
