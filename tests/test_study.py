"""The study end to end: smoke study, a diverging point, interruption and --resume.

Each starts several Ray Train runs; marked slow, run in CI.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from hamjepa.cli import study_main
from hamjepa.study.space import SearchSpace

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SEARCH_SPACE = SearchSpace.from_file(ROOT / "studies" / "energy_budget.yaml")


def _runs(uri, experiment="hamjepa-energy_budget"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hamjepa.role") == "study"]
    children = [r for r in runs if r.data.tags.get("hamjepa.role") in ("trial", "reference")]  # the study's child runs
    return client, parents, children


def _args(tmp_path, ray_cluster, *extra):
    return ["--smoke-test", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path",
            str(tmp_path / "ray"), "--address", ray_cluster, *extra]


def _capture_result(monkeypatch):
    """study_main's StudyResult (with the search's Optuna study), kept while it is printed as usual."""
    from hamjepa import cli

    captured = {}
    original = cli._print_result

    def keep(settings, result):
        captured["result"] = result
        return original(settings, result)

    monkeypatch.setattr(cli, "_print_result", keep)
    return captured


def _check_decision_rule(summary_md, summary_csv, parent):
    """The primary is declared on the parent run; the verdict word is the primary's, once in the table and once in
    the verdict line; the design's detectable difference and each method's outcomes are stated; tuning comes first."""
    assert parent.data.params["study.primary"] == "test_knn20_top1"
    assert summary_md.startswith("Tuning: HamJEPA tuned over 2 Optuna trials")
    verdict = next(line for line in summary_md.splitlines() if line.startswith("Verdict"))
    assert verdict.startswith("Verdict (primary, declared before the study: test kNN@20): ")
    assert "HamJEPA 2 finished, 0 diverged, 0 failed; SIGReg 2 finished, 0 diverged, 0 failed" in verdict
    words = ("HamJEPA ahead on ", "SIGReg ahead on ", "not resolved at n = 2 on ")
    assert sum(summary_md.count(word) for word in words) == 2  # the primary's row and the verdict line
    assert "| detectable |" in summary_md and ",primary," in summary_csv


def _check_theory_and_pictures(client, by_phase, summary_md, plots):
    """The theory check: every compared run measured its within-class spread inside the probe's range; every
    finished HamJEPA run drew its learned flow."""
    assert "theory_gap_vs_probe.png" in plots and "Theory check (qp readout)" in summary_md
    assert any(word in summary_md for word in (") held:", "is contradicted:", "is not resolved"))
    assert "Does the gap predict accuracy? Spearman's correlation" in summary_md and "(n = " in summary_md
    for child in by_phase["compare"]:
        metrics = child.data.metrics
        assert 1.0 <= metrics["theory_rho_qp"] <= 9.0  # inside the probe's range: k = 10 classes - 1
        assert "theory_gap_within_qp" in metrics and 0.0 < metrics["theory_signal_fraction_qp"] < 1.0
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert child.data.tags["hamjepa.git_commit"] and "model" in artifacts  # provenance, the encoder for reuse
    for child in [*by_phase["compare"], *by_phase["search"]]:  # every finished HamJEPA run draws its flow
        if child.data.tags["hamjepa.method"] == "hamjepa" and child.data.tags["hamjepa.status"] == "finished":
            assert "plots/flow.png" in {a.path for a in client.list_artifacts(child.info.run_id, "plots")}


def test_smoke_study_logs_parent_children_metrics_and_summary(ray_cluster, tmp_path, capsys, monkeypatch):
    captured = _capture_result(monkeypatch)
    assert study_main("energy_budget", SEARCH_SPACE, _args(tmp_path, ray_cluster)) == 0
    printed = capsys.readouterr().out
    client, parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db")

    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    # 2 HamJEPA search trials, then 2 paired seeds each of HamJEPA and SIGReg, then the initialisation reference
    assert len(children) == 7
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)
    by_phase = {}
    for child in children:
        by_phase.setdefault(child.data.tags["hamjepa.phase"], []).append(child)
    assert {phase: len(runs) for phase, runs in by_phase.items()} == {"search": 2, "compare": 4, "reference": 1}
    by_phase["confirm"] = [c for c in by_phase["compare"] if c.data.tags["hamjepa.method"] == "hamjepa"]
    by_phase["baseline"] = [c for c in by_phase["compare"] if c.data.tags["hamjepa.method"] == "sigreg"]
    # the search ran on the base seed; the comparison on fresh seeds, the same for both methods
    assert {c.data.params["seed"] for c in by_phase["search"]} == {"0"}
    assert sorted(c.data.params["seed"] for c in by_phase["confirm"]) == ["1", "2"]
    assert sorted(c.data.params["seed"] for c in by_phase["baseline"]) == ["1", "2"]
    assert {c.data.tags["hamjepa.method"] for c in by_phase["baseline"]} == {"sigreg"}
    assert {c.data.params["optim.grad_clip"] for c in by_phase["baseline"]} == {"0.0"}  # SIGReg unclipped
    assert {c.data.params["optim.grad_clip"] for c in by_phase["confirm"]} == {"1.0"}
    for child in by_phase["search"]:
        for key in SEARCH_SPACE:
            assert key in child.data.params, key
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_knn20_top1")]
        assert steps == list(range(len(steps))) and len(steps) >= 2  # every epoch until ASHA stops it, from 0
    for child in by_phase["compare"]:  # nothing selects on a compared run: its objective at the start and the end
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_knn20_top1")] == [0, 2]
    for child in by_phase["compare"]:  # every compared run measured its encoder at initialisation in full
        assert "init/test_knn20_top1" in child.data.metrics and "init/val_knn20_top1" in child.data.metrics
    for child in by_phase["search"]:  # search trials share the base seed's encoder: epoch 0 is the objective alone
        assert not any(key.startswith("init/") for key in child.data.metrics)
        assert child.data.params["eval.initial_readouts"] == "False"
    # the paper's defaults were the first point
    defaults = [c for c in by_phase["search"]
                if c.data.params["predictor.dt"] == "0.05" and c.data.params["predictor.steps"] == "2"]
    assert len(defaults) == 1

    baseline = by_phase["baseline"][0]
    assert baseline.data.tags["hamjepa.status"] == "finished"
    assert [m.step for m in client.get_metric_history(baseline.info.run_id, "train/loss")] == [1, 2]
    for key in ("test_knn20_top1", "test_linprobe_top1", "val_linprobe_top1"):
        assert key in baseline.data.metrics

    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"summary.md", "summary.csv", "plots", "optuna.db"} <= artifacts
    summary_md = Path(client.download_artifacts(parent_id, "summary.md", str(tmp_path))).read_text()
    assert summary_md in printed  # the printed summary is the logged one
    assert "seeds 1, 2 (n = 2)" in summary_md and "HamJEPA - SIGReg" in summary_md
    # its numbers are MLflow's, from the paired runs only (never the selected search trial)
    summary = captured["result"].summary
    row = next(r for r in summary.rows if r.metric == "test_knn20_top1")
    assert row.seeds == [1, 2]
    confirm = {int(c.data.params["seed"]): c.data.metrics["test_knn20_top1"] for c in by_phase["confirm"]}
    sigreg = {int(c.data.params["seed"]): c.data.metrics["test_knn20_top1"] for c in by_phase["baseline"]}
    assert row.hamjepa.mean == pytest.approx(sum(confirm.values()) / 2)
    assert row.delta.mean == pytest.approx(sum(confirm[s] - sigreg[s] for s in (1, 2)) / 2)
    assert row.delta.has_interval and row.delta.low < row.delta.mean < row.delta.high
    summary_csv = Path(client.download_artifacts(parent_id, "summary.csv", str(tmp_path))).read_text()
    assert summary_csv.splitlines()[0].startswith(
        "metric,label,role,n,hamjepa_mean,hamjepa_std,sigreg_mean,sigreg_std,delta,delta_ci_low,delta_ci_high")
    _check_decision_rule(summary_md, summary_csv, parents[0])
    # learning is judged against 3 untrained encoders (smoke), logged as one run, one step per encoder
    reference = by_phase["reference"][0]
    assert reference.info.status == "FINISHED" and reference.data.params["reference.n"] == "3"
    initial = [m.value for m in client.get_metric_history(reference.info.run_id, "hamjepa/test_knn20_top1")]
    assert len(initial) == 3 and len(client.get_metric_history(reference.info.run_id, "sigreg/test_knn20_top1")) == 3
    assert row.gains["HamJEPA"].mean == pytest.approx(row.hamjepa.mean - sum(initial) / 3)
    assert "the mean of 3 encoders at initialisation" in summary_md
    # where the time went: the phases of this invocation, and the parts of every run
    assert "Wall time (this invocation): search " in summary_md and ", reference " in summary_md
    assert "Inside the runs (" in summary_md and "training " in summary_md
    assert parents[0].data.metrics["time/phase_compare_s"] > 0
    parent_metrics = client.get_run(parent_id).data.metrics
    assert parent_metrics["delta_test_knn20_top1"] == pytest.approx(row.delta.mean)
    assert parent_metrics["delta_test_knn20_top1_ci_low"] == pytest.approx(row.delta.low)
    assert "delta_test_knn20_top1_ci_high" in parent_metrics and "gain_sigreg_test_linprobe_top1" in parent_metrics
    plots = {Path(a.path).name for a in client.list_artifacts(parent_id, "plots")}
    assert {"optuna_optimization_history.png", "optuna_intermediate_values.png", "optuna_parallel_coordinate.png",
            "optuna_slice.png"} <= plots
    assert "optuna_param_importances.png" not in plots and "complete search trials" in summary_md  # 2 < threshold
    _check_theory_and_pictures(client, by_phase, summary_md, plots)
    assert "flow_reversibility_error" in by_phase["confirm"][0].data.metrics
    assert "mlflow ui --backend-store-uri" in printed
    # the search as an Optuna study file: every search trial, its state, params and per-epoch values
    database = client.download_artifacts(parent_id, "optuna.db", str(tmp_path))
    saved = optuna.load_study(study_name=captured["result"].study_id, storage=f"sqlite:///{database}")
    assert len(saved.trials) == len(by_phase["search"])
    for trial in saved.trials:
        run = next(c for c in by_phase["search"] if c.info.run_id == trial.user_attrs["mlflow_run_id"])
        assert trial.params["predictor.dt"] == float(run.data.params["predictor.dt"])
        assert trial.state == {"finished": optuna.trial.TrialState.COMPLETE,
                               "stopped": optuna.trial.TrialState.PRUNED}[run.data.tags["hamjepa.status"]]
        assert 0 in trial.intermediate_values  # epoch 0: the initialisation

    # Optuna was told the truth: one Optuna trial per search trial, PRUNED exactly when ASHA stopped it
    optuna_trials = captured["result"].optuna_study.get_trials(deepcopy=False)
    assert len(optuna_trials) == len(by_phase["search"])
    expected = {"finished": optuna.trial.TrialState.COMPLETE, "stopped": optuna.trial.TrialState.PRUNED}
    for child in by_phase["search"]:
        match = [t for t in optuna_trials if t.params["predictor.dt"] == float(child.data.params["predictor.dt"])]
        assert len(match) == 1
        assert match[0].state == expected[child.data.tags["hamjepa.status"]]
        assert set(match[0].intermediate_values) == {int(m.step) for m in
                                                     client.get_metric_history(child.info.run_id, "val_knn20_top1")}


def test_the_configured_k_names_the_objective_end_to_end(ray_cluster, tmp_path, capsys, monkeypatch):
    captured = _capture_result(monkeypatch)
    args = _args(tmp_path, ray_cluster, "--set", "eval.knn_k=10", "--num-samples", "1", "--seeds", "1",
                 "--reference", "0")
    assert study_main("knn10", SearchSpace.from_mapping({"predictor.dt": "loguniform(0.01, 0.2)"}), args) == 0
    client, parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db", "hamjepa-knn10")
    assert len(children) == 3 and all(c.data.tags["hamjepa.status"] == "finished" for c in children)
    for child in children:  # complete, and measured with k = 10 throughout (at initialisation: compared runs)
        initial = {"init/test_knn10_top1"} if child.data.tags["hamjepa.phase"] == "compare" else set()
        assert {"val_knn10_top1", "test_knn10_top1", *initial} <= child.data.metrics.keys()
        assert not any("knn20" in key for key in child.data.metrics)
    summary = captured["result"].summary
    assert summary.selected is not None and summary.objective == "val_knn10_top1"
    assert [row.delta.n for row in summary.rows] == [1, 1, 1, 1]
    printed = capsys.readouterr().out
    assert "test kNN@10" in printed and "n = 1: no interval, nothing resolved" in printed


def test_a_tuned_baseline_gets_its_own_search_and_its_selection_is_compared(ray_cluster, tmp_path, capsys,
                                                                          monkeypatch):
    """--tune-baseline: SIGReg's own search (same budget, scheduler and selection), and the comparison trains each
    method's selected configuration on the paired seeds."""
    captured = _capture_result(monkeypatch)
    args = _args(tmp_path, ray_cluster, "--tune-baseline", "--seeds", "1", "--reference", "0")
    assert study_main("tuned", SearchSpace.from_mapping({"predictor.dt": "loguniform(0.01, 0.2)"}), args) == 0
    client, parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db", "hamjepa-tuned")
    by_phase = {}
    for child in children:
        by_phase.setdefault(child.data.tags["hamjepa.phase"], []).append(child)
    assert {phase: len(runs) for phase, runs in by_phase.items()} == {"search": 2, "search-baseline": 2, "compare": 2}
    assert {c.data.tags["hamjepa.method"] for c in by_phase["search-baseline"]} == {"sigreg"}
    assert parents[0].data.params["study.tune_baseline"] == "True"
    summary = captured["result"].summary
    chosen = summary.baseline_selected
    assert chosen is not None and chosen.phase == "search-baseline"
    compared = next(c for c in by_phase["compare"] if c.data.tags["hamjepa.method"] == "sigreg")
    for key in ("sigreg.weight", "sigreg.num_directions"):  # the selected configuration, not the defaults
        assert float(compared.data.params[key]) == pytest.approx(float(chosen.params[key]))
    printed = capsys.readouterr().out
    assert "Tuning: HamJEPA and SIGReg each tuned over 2 Optuna trials" in printed
    assert "SIGReg search trials: 2 (" in printed and "SIGReg selected on validation" in printed


def test_a_diverging_trial_is_recorded_and_the_study_completes(ray_cluster, tmp_path, capsys):
    space = SearchSpace.from_mapping({"predictor.dt": "loguniform(0.01, 200.0)"})
    code = study_main("diverging", space, _args(tmp_path, ray_cluster, "--seeds", "0"),
                      initial_points=[{"predictor.dt": 150.0}])
    assert code == 0
    client, parents, children = _runs(f"sqlite:///{tmp_path}/mlflow.db", "hamjepa-diverging")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_dt = {c.data.params["predictor.dt"]: c for c in children}
    diverged = by_dt["150.0"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["hamjepa.status"] == "diverged"
    assert "exploded" in diverged.data.tags["hamjepa.reason"] or "non-finite" in diverged.data.tags["hamjepa.reason"]
    assert diverged.data.metrics["val_knn20_top1"] == 0.0
    healthy = by_dt["0.05"]
    assert healthy.data.tags["hamjepa.status"] in ("finished", "stopped")
    assert "1 diverged" in capsys.readouterr().out


def _start_and_stop_at(command, env, log_path, uri, phase, sig):
    """Start a study, send `sig` once a run of `phase` has logged an epoch; returns the trial runs it left.

    One trial at a time and 8 epochs per run (about a second each), so the signal lands inside that run,
    with the phase's other runs not started, whatever the machine's speed.
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        trainers = log_path.parent / "ray" / "energy_budget"
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.5)
            # Read MLflow only once a trial trains: a client opening the store while the study creates it
            # would race its schema migration.
            if any(trainers.glob("*/train/*")) and _has_experiment(uri) and _logged_an_epoch(uri, phase):
                break
        assert process.poll() is None, log_path.read_text()[-3000:]
        process.send_signal(sig)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return _runs(uri)[2]


@pytest.mark.parametrize(("phase", "sig"), [("search", signal.SIGINT), ("compare", signal.SIGKILL),
                                           ("compare", signal.SIGINT)])
def test_a_stopped_study_resumes_exactly_once_per_run(ray_cluster, tmp_path, phase, sig):
    """Ctrl-C in the search or the comparison, or the driver process killed in the comparison: --resume finishes
    the same study with one MLflow run per trial, none left RUNNING. Ctrl-C closes the run it cut as KILLED at
    once; every finished run is rid of the reason the interruption gave it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, str(ROOT / "studies" / "energy_budget.py"),
               *_args(tmp_path, ray_cluster, "--seeds", "1", "--epochs", "8", "--max-concurrent", "1")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    left = _start_and_stop_at(command, env, tmp_path / "first.log", uri, phase, sig)
    _, parents, _ = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == ("KILLED" if sig == signal.SIGINT else "RUNNING")
    cut = [c for c in left if c.info.status in ("RUNNING", "KILLED")]
    assert len(cut) == 1 and cut[0].data.tags["hamjepa.phase"] == phase  # stopped inside the one running trial
    if sig == signal.SIGINT:  # closed with the parent; a killed process could close nothing
        assert cut[0].info.status == "KILLED" and "interrupted" in cut[0].data.tags["hamjepa.reason"]
    assert len(left) == (1 if phase == "search" else 3)  # 2 search trials, then 2 compare cells, one at a time

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "ignoring passed-in ProgressReporter" not in resumed.stderr  # a restored search keeps our console table
    _, after, children = _runs(uri)
    assert [p.info.run_id for p in after] == [parents[0].info.run_id] and after[0].info.status == "FINISHED"
    keys = [c.data.tags["hamjepa.key"] for c in children]
    # one MLflow run per trial (the cut one continued, not duplicated), and one initialisation reference
    assert len(keys) == len(set(keys)) == 5
    assert [c.data.tags["hamjepa.phase"] for c in children].count("reference") == 1
    assert {c.info.run_id for c in left} <= {c.info.run_id for c in children}
    assert all(c.info.status == "FINISHED" for c in children)
    # an ASHA-stopped trial keeps its own reason; the interruption's is gone from every run that finished
    assert [c.data.tags["hamjepa.reason"] for c in children
            if "interrupted" in c.data.tags.get("hamjepa.reason", "")] == []
    # the live Optuna study continued too: one Optuna trial per search run, none left RUNNING, with durations
    study_id = after[0].info.run_name
    live = optuna.load_study(study_name=study_id,
                             storage=f"sqlite:///{tmp_path}/ray/energy_budget/{study_id}/optuna.db")
    trials = live.get_trials(deepcopy=False)
    assert len(trials) == 2 and all(t.state.is_finished() and t.duration is not None for t in trials)
    compare = sorted(c.data.tags["hamjepa.trial_id"] for c in children if c.data.tags["hamjepa.phase"] == "compare")
    assert compare == ["hamjepa-seed1", "sigreg-seed1"]
    continued = next(c for c in children if c.info.run_id == cut[0].info.run_id)
    client = MlflowClient(uri)
    epochs = [m.step for m in client.get_metric_history(continued.info.run_id, "epoch")]
    assert sorted(epochs) == list(range(9))  # every epoch's metrics exactly once (0 = initialisation)


def _logged_an_epoch(uri, phase):
    return any(c.data.tags.get("hamjepa.phase") == phase and "epoch" in c.data.metrics for c in _runs(uri)[2])


def _has_experiment(uri):
    try:
        return MlflowClient(uri).get_experiment_by_name("hamjepa-energy_budget") is not None
    except Exception:  # noqa: BLE001 - the database may be mid-creation
        return False
