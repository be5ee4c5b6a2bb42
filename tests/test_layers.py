"""The layers import downwards only: import-linter's contracts in pyproject.toml hold, and they can fail."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports over the `hamjepa` package found first on PYTHONPATH (`package_parent`)."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([LINT_IMPORTS, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_a_method_module_importing_the_training_loop_breaks_the_layers(tmp_path):
    shutil.copytree(ROOT / "hamjepa", tmp_path / "hamjepa", ignore=shutil.ignore_patterns("__pycache__"))
    model = tmp_path / "hamjepa" / "method" / "model.py"
    model.write_text(model.read_text() + "\nfrom hamjepa.train import loop  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "hamjepa.method.model -> hamjepa.train.loop" in result.stdout
