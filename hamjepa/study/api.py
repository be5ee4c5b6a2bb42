"""A study from Python, for a notebook: the same study as `python studies/energy_budget.py`, without a command line.

    from hamjepa import Study, profile

    study = Study("my_question", profile("quick"), "studies/energy_budget.yaml", num_samples=4, seeds=3,
                  tracking_uri="sqlite:///runs/mlflow.db")
    result = study.run()        # connects to Ray itself: address=..., else $RAY_ADDRESS, else a local Ray
    result.verdict              # the primary metric's verdict, as `hamjepa report` prints it
    result.table                # the summary table as data (one dict per metric, the columns of summary.csv)
    result.parent_run_id        # the MLflow parent run; result.selected: the selected configuration's values
    result.optuna_study         # the search's optuna.Study (its live storage: result.optuna_storage)

Every input is checked when the Study is made, in the command line's words (a UserError, one sentence), before Ray
or MLflow starts; `run()` then connects to Ray (or uses the Ray this process already joined) and runs the study.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hamjepa import checks
from hamjepa.config import Config, profile
from hamjepa.errors import UserError
from hamjepa.study.invocation import StudyResult, check_resumable
from hamjepa.study.settings import StudySettings, search_params
from hamjepa.study.space import SearchSpace
from hamjepa.train.destinations import check_destinations
from hamjepa.train.resources import Resources


def as_space(space: SearchSpace | Mapping[str, str] | str | Path) -> SearchSpace:
    """A SearchSpace from itself, a mapping of dotted keys to distribution texts, or a YAML file's path."""
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, Mapping):
        return SearchSpace.from_mapping(space)
    return SearchSpace.from_file(space)


# StudySettings' fields that Study sets itself, from its own arguments or the checks.
_OWN = {"name", "base", "resources", "tracking_uri", "experiment", "storage_path", "verbose", "searches"}


def _check_options(options: Mapping[str, Any]) -> None:
    valid = sorted(f.name for f in dataclasses.fields(StudySettings) if f.name not in _OWN)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid options: {', '.join(valid)}"
            raise UserError(f"Study option '{key}' is unknown; {hint}")


class Study:
    """One search study: `config` (default: the quick profile) searched over `space`, then compared with SIGReg.

    The options are the study script's flags, by the same names (`num_samples` for --num-samples, `workers` for
    --workers, ...); `address` is Ray's (default $RAY_ADDRESS, else a local Ray).
    """

    def __init__(self, name: str, config: Config | None = None,
                 space: SearchSpace | Mapping[str, str] | str | Path = "", *, address: str | None = None,
                 workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 tracking_uri: str | None = None, experiment: str | None = None, storage_path: str | None = None,
                 verbose: bool = False, **options: Any):
        checks.run_name("name", name)
        if not space:
            raise UserError("Study needs a search space: a SearchSpace, a mapping of dotted config keys to "
                                   "distributions, or a YAML file such as studies/energy_budget.yaml.")
        _check_options(options)
        base = config if config is not None else profile("quick")
        if base.data.root and not Path(base.data.root).is_absolute():  # Ray's workers run in other folders
            base = base.override({"data.root": str(Path(base.data.root).resolve())})
        self.space = as_space(space)
        self.space.check(base)
        resources = Resources(workers, cpus_per_worker, gpus_per_worker)
        uri = check_destinations(resources, address=address, experiment=experiment, tracking_uri=tracking_uri,
                                 storage_path=storage_path)
        self.settings = StudySettings(name=name, base=base, resources=resources, tracking_uri=uri,
                                      experiment=experiment or "", storage_path=storage_path or "", verbose=verbose,
                                      **options)
        self.address = address
        check_resumable(self.settings, search_params(self.settings, self.space))

    def run(self) -> StudyResult:
        """Check the data, connect to Ray, run the study; the result (an interrupted one says so)."""
        from hamjepa.study.runner import run_study
        from hamjepa.train import launch

        launch.preflight(self.settings.base)
        launch.connect_ray(self.address, verbose=self.settings.verbose, worker_logs=False)
        return run_study(self.settings, self.space)
