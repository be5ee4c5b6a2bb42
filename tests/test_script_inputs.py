"""Bad inputs to the benchmarks (`python -m hamjepa.bench <name>`) and to the cluster scripts (cluster/mlflow_store.py,
`cluster/aws_setup.py check`), refused as tests/test_bad_inputs.py refuses them for `hamjepa` and the study scripts.

Each entry runs in-process, in an empty working directory, and must end with exit code 2, exactly one line on
stderr that names the input, no traceback, nothing on stdout, nothing created (in the working directory, beside
the inputs, at the remote), at once; and the work itself (a benchmark's timing, a backup or a restore) fails the
test when reached. A control runs each benchmark's valid flags and sees it reach its work.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from hamjepa.bench import __main__ as bench
from tests.path_makers import folder, named_pipe, text_file, under_a_file

ROOT = Path(__file__).resolve().parents[1]
REFUSAL_S = 10  # seconds a refusal may take
LONG = "x" * 300  # a path component longer than NAME_MAX (255 bytes)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", ROOT / "cluster" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STORE, SETUP = _script("mlflow_store"), _script("aws_setup")


class Reached(AssertionError):
    """Work started: a benchmark measured, or a backup, restore or status ran."""


def _tripwire(what: str):
    def reached(*args, **kwargs):
        raise Reached(f"{what} was called")
    return reached


# -- inputs ------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """`argv` with `{in}` (a folder outside the working directory) and `{made}` (what `make` built there)."""

    id: str
    argv: list[str]
    words: str
    make: Callable[[Path], Path] | None = None


def _contents(root: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else "other" for p in sorted(root.rglob("*"))}


def check_refused(run: Callable[[list[str]], int | None], case: Case, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    made = case.make(inputs / "made") if case.make else inputs
    argv = [a.replace("{in}", str(inputs)).replace("{made}", str(made)) for a in case.argv]
    before = _contents(inputs)
    started = time.monotonic()
    try:
        code = run(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert time.monotonic() - started < REFUSAL_S, "a refusal must come at once"
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}; stderr: {err}"
    assert len(err.splitlines()) == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert "error: " in err and case.words in err, err
    assert out == ""
    assert _contents(inputs) == before  # nothing created or changed beside the inputs
    assert list(Path.cwd().iterdir()) == []  # nor in the working directory


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# -- the benchmarks ------------------------------------------------------------------------------------------------

BENCH_CASES = [
    Case("unknown-benchmark", ["nope"], "no benchmark 'nope'"),
    Case("predictor-rounds-zero", ["predictor", "--rounds", "0"], "--rounds = 0"),
    Case("predictor-rounds-negative", ["predictor", "--rounds", "-1"], "--rounds = -1"),
    Case("predictor-rounds-word", ["predictor", "--rounds", "many"], "--rounds"),
    Case("predictor-steps-zero", ["predictor", "--steps", "0"], "--steps = 0"),
    Case("predictor-steps-huge", ["predictor", "--steps", "1000000"], "--steps = 1000000"),
    Case("predictor-batch-zero", ["predictor", "--batch", "0"], "--batch = 0"),
    Case("predictor-hidden-zero", ["predictor", "--hidden", "0"], "--hidden = 0"),
    Case("predictor-unknown-flag", ["predictor", "--set", "predictor.dt=0.1"], "unrecognized arguments"),
    Case("step-dt-inf", ["step", "--set", "predictor.dt=inf"], "'predictor.dt' = inf"),
    Case("step-dt-nan", ["step", "--set", "predictor.dt=.nan"], "'predictor.dt' = nan"),
    Case("step-dt-negative", ["step", "--set", "predictor.dt=-0.1"], "'predictor.dt'"),
    Case("step-unknown-key", ["step", "--set", "predictor.stepz=3"], "predictor.stepz"),
    Case("step-section-set", ["step", "--set", "predictor=3"], "'predictor' is a section"),
    Case("step-value-word", ["step", "--set", "predictor.steps=two"], "'predictor.steps'"),
    Case("step-set-without-equals", ["step", "--set", "predictor.steps"], "dotted.key=value"),
    Case("step-rounds-zero", ["step", "--rounds", "0"], "--rounds = 0"),
    Case("step-rounds-negative", ["step", "--rounds", "-1"], "--rounds = -1"),
    Case("step-epochs-zero", ["step", "--epochs", "0"], "--epochs = 0"),
    Case("step-batch-zero", ["step", "--batch", "0"], "--batch = 0"),
    Case("step-images-too-few", ["step", "--images", "5"], "--images = 5"),
    Case("step-images-too-many", ["step", "--images", "5000"], "--images = 5000"),
    Case("step-batch-beyond-the-images", ["step", "--batch", "4000"], "--batch = 4000"),
    Case("step-profile", ["step", "--profile", "laptop"], "--profile"),
    Case("step-part", ["step", "--part", "everything"], "--part"),
    Case("augment-batch-zero", ["augment", "--batch", "0"], "--batch = 0"),
    Case("augment-workers-negative", ["augment", "--workers", "-1"], "--workers = -1"),
    Case("augment-images-below-two-batches", ["augment", "--images", "100"], "--images = 100"),
    Case("gpu-steps-zero", ["gpu", "--steps", "0"], "--steps = 0"),
    Case("gpu-images-below-a-batch", ["gpu", "--images", "100"], "--images = 100"),
    Case("gpu-out-is-a-file", ["gpu", "--out", "{made}"], "--out", text_file(b"x")),
    Case("gpu-out-under-a-file", ["gpu", "--out", "{made}"], "is not a folder this user can write", under_a_file),
    Case("gpu-out-long-name", ["gpu", "--out", "{in}/" + LONG], "longer than the 255"),
]

# A benchmark's valid flags, and the work each reaches first (replaced by a tripwire).
BENCH_WORK = {"predictor": (["predictor"], "hamjepa.bench.predictor.interleaved_medians"),
              "step": (["step"], "hamjepa.bench.step.method_steps"),
              "augment": (["augment"], "hamjepa.bench.augment.throughput"),
              "gpu": (["gpu", "--out", "out"], "hamjepa.bench.gpu.run_checks")}


@pytest.fixture
def bench_tripwires(workdir, monkeypatch):
    import torch

    for _, target in BENCH_WORK.values():
        monkeypatch.setattr(target, _tripwire(target))
    for target in ("hamjepa.bench.step.placement_epochs", "hamjepa.bench.step.compile_steps"):
        monkeypatch.setattr(target, _tripwire(target))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # gpu's flags checked as on a GPU machine
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # gpu sets these two:
    monkeypatch.setenv("NCCL_DEBUG", os.environ.get("NCCL_DEBUG", "WARN"))  # restored after the test
    return workdir


@pytest.mark.parametrize("case", BENCH_CASES, ids=[c.id for c in BENCH_CASES])
def test_a_bad_benchmark_flag_is_one_sentence_before_any_measurement(case, bench_tripwires, tmp_path, capsys):
    check_refused(bench.main, case, tmp_path, capsys)


@pytest.mark.parametrize("name", list(BENCH_WORK))
def test_valid_benchmark_flags_reach_the_measurement(name, bench_tripwires):
    """The control: the entries above differ from valid flags only in their bad part."""
    argv, target = BENCH_WORK[name]
    with pytest.raises(Reached, match=target):
        bench.main(argv)
    assert list(bench_tripwires.iterdir()) == []  # gpu's --out is created only when the report is written


def test_a_benchmark_refusal_is_one_line_from_a_fresh_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hamjepa.bench", "step", "--set", "predictor.dt=inf"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == ("python -m hamjepa.bench step: error: config field 'predictor.dt' = inf is invalid: must "
                           "be a finite number.\n")
    assert list(tmp_path.iterdir()) == []


# -- cluster/mlflow_store.py ---------------------------------------------------------------------------------------

REMOTE = ["--remote", "file://{in}/bucket"]
STORE_CASES = [
    Case("status-file-folder", ["backup", *REMOTE, "--store", "{in}/m.db", "--status-file", "{made}"],
         "--status-file '", folder),
    Case("status-file-under-a-file", ["backup", *REMOTE, "--store", "{in}/m.db", "--status-file", "{made}"],
         "--status-file", under_a_file),
    Case("status-file-pipe", ["restore", *REMOTE, "--store", "{in}/m.db", "--status-file", "{made}"],
         "is a named pipe", named_pipe),
    Case("status-file-long-name", ["backup", *REMOTE, "--store", "{in}/m.db", "--status-file", "{in}/" + LONG],
         "longer than the 255"),
    Case("status-action-folder", ["status", *REMOTE, "--status-file", "{made}"], "is a folder", folder),
    Case("store-folder", ["backup", *REMOTE, "--store", "{made}"], "--store '", folder),
    Case("store-under-a-file", ["restore", *REMOTE, "--store", "{made}"], "--store", under_a_file),
    Case("keep-zero", ["backup", *REMOTE, "--store", "{in}/m.db", "--keep", "0"], "--keep"),
]


@pytest.mark.parametrize("case", STORE_CASES, ids=[c.id for c in STORE_CASES])
def test_a_bad_store_script_path_is_one_sentence_before_any_transfer(case, workdir, tmp_path, monkeypatch, capsys):
    for work in ("backup", "restore", "status"):
        monkeypatch.setattr(STORE, work, _tripwire(work))
    check_refused(STORE.main, case, tmp_path, capsys)


def test_the_store_script_reaches_its_work_with_valid_paths(workdir, tmp_path, monkeypatch):
    for work in ("backup", "restore"):
        monkeypatch.setattr(STORE, work, _tripwire(work))
    for action in ("backup", "restore"):
        with pytest.raises(Reached, match=action):
            STORE.main([action, "--remote", f"file://{tmp_path}/bucket", "--store", str(tmp_path / "new" / "m.db")])


# -- cluster/aws_setup.py check ---------------------------------------------------------------------------------

SETUP_CASES = [
    Case("missing", ["check", "{in}/aws.yaml"], "does not exist"),
    Case("folder", ["check", "{made}"], "is a folder", folder),
    Case("named-pipe", ["check", "{made}"], "is not a regular file", named_pipe),
    Case("list", ["check", "{made}"], "holds a list", text_file(b"- provider\n- head_node_type\n")),
    Case("number", ["check", "{made}"], "holds a number (3)", text_file(b"3\n")),
    Case("string", ["check", "{made}"], "holds a string", text_file(b"just some words\n")),
    Case("empty", ["check", "{made}"], "holds nothing", text_file(b"")),
    Case("not-yaml", ["check", "{made}"], "is not valid YAML", text_file(b"provider: [1\n")),
    Case("not-utf8", ["check", "{made}"], "is not UTF-8", text_file(b"cluster_name: \xff\n")),
    Case("another-mapping", ["check", "{made}"], "is not a Ray cluster config",
         text_file(b"predictor.dt: loguniform(0.01, 0.2)\n")),
    Case("policies-list", ["policies", "{made}"], "holds a list", text_file(b"- 1\n")),
]


@pytest.mark.parametrize("case", SETUP_CASES, ids=[c.id for c in SETUP_CASES])
def test_a_bad_cluster_config_is_one_sentence(case, workdir, tmp_path, capsys):
    """aws_setup.py runs where the project may not be installed, so its refusals are its own: `aws_setup.py: ...`."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    made = case.make(inputs / "made") if case.make else inputs
    argv = [a.replace("{in}", str(inputs)).replace("{made}", str(made)) for a in case.argv]
    started = time.monotonic()
    assert SETUP.main(argv) == 2
    assert time.monotonic() - started < REFUSAL_S
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("aws_setup.py: the cluster config '") and case.words in err, err


def test_an_unreadable_cluster_config_is_one_sentence(tmp_path, monkeypatch, capsys):
    """Root reads any file whatever its mode, so the refused read is simulated."""
    path = tmp_path / "aws.yaml"
    path.write_text((ROOT / "cluster" / "aws.yaml").read_text())

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert SETUP.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"aws_setup.py: the cluster config '{path}' cannot be read (Permission denied); check its " \
                  "permissions.\n"
