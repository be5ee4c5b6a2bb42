"""Where a run or a study goes, checked before any work: the Ray cluster (--address, else $RAY_ADDRESS, else a
local Ray that must fit the run), the MLflow experiment and tracking store, and the storage folder. The command
line and the Python API (`hamjepa.Study`) both go through here, so they refuse the same inputs in the same words.
No heavy import at the top, and none at all but where a check needs one: Ray's own search for the cluster that
--address auto names (reachability.running_cluster), torch's GPU count when a local run asks for GPUs
(checks.cuda_devices).
"""

from __future__ import annotations

import os

from hamjepa import checks, reachability, storage
from hamjepa.train.resources import Resources


def check_destinations(resources: Resources, *, address: str | None, experiment: str | None,
                       tracking_uri: str | None, storage_path: str | None) -> str:
    """One sentence (UserError) for the first destination that cannot work; returns the resolved tracking URI."""
    resolved = checks.ray_address(address)
    reachability.ray_reachable(resolved, "--address" if address else "$RAY_ADDRESS")
    checks.experiment_name("--experiment", experiment)
    checks.experiment_name("$MLFLOW_EXPERIMENT_NAME", os.environ.get("MLFLOW_EXPERIMENT_NAME"))
    uri = checks.resolve_tracking_uri(tracking_uri)
    checks.check_tracking_uri(uri)
    storage.check_writable(storage_path)
    if not resolved:  # Ray will start here, so this machine is the whole cluster
        resources.check_local_capacity()
    return uri
