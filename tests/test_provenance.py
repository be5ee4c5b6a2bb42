"""Every run can be traced to its code and libraries."""

import subprocess
from importlib import metadata

from hamjepa import provenance


def test_tags_name_the_commit_the_dirty_state_and_the_library_versions():
    tags = provenance.tags("studies/energy_budget.py")
    head = subprocess.run(["git", "-C", str(provenance.REPOSITORY), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if head:  # a git checkout (CI clones one)
        assert tags["hamjepa.git_commit"] == head == tags["mlflow.source.git.commit"]  # MLflow's Source column too
        assert tags["hamjepa.git_dirty"] in ("true", "false")
    else:  # an exported tree: said, not guessed
        assert tags["hamjepa.git_commit"] == "unknown" and "mlflow.source.git.commit" not in tags
    assert tags["hamjepa.version.torch"] == metadata.version("torch")
    assert tags["hamjepa.version.ray"] == metadata.version("ray")
    assert tags["mlflow.source.name"] == "studies/energy_budget.py"


def test_outside_a_checkout_the_commit_is_unknown_not_an_error(monkeypatch, tmp_path):
    provenance.code.cache_clear()
    monkeypatch.setattr(provenance, "REPOSITORY", tmp_path)  # not a git repository
    try:
        assert provenance.code() == {"hamjepa.git_commit": "unknown", "hamjepa.git_dirty": "unknown"}
    finally:
        provenance.code.cache_clear()
