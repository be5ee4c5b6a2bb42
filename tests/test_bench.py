"""Benchmarks' pieces at tiny sizes on the CPU: `bench step`'s placement comparison and `bench gpu`'s checks."""

import json

import pytest
import torch

from hamjepa.bench import gpu, step
from hamjepa.config import SMOKE_OVERRIDES, profile
from hamjepa.data.sources import read_cifar

TINY = {"encoder.width": 0.125, "optim.batch_size": 8, "data.image_size": 16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_cuda_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit) as caught:
        gpu.main(["--out", str(tmp_path / "out")])
    message = str(caught.value.code)
    assert message == gpu.NO_CUDA
    assert message.endswith(".") and ". " not in message and "\n" not in message and "CUDA device" in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_process_group_check_all_reduces_exactly():
    """The NCCL check's code path with gloo on the CPU: two spawned ranks, all-reduce of 1 + 2."""
    record = gpu.process_group_check("gloo", world=2)
    assert record["ok"], record["error"]
    assert record["all_reduce"] == [3.0, 3.0] and record["expected"] == 3.0 and record["error"] is None


def test_step_throughput_is_batch_over_time():
    cfg = profile("cifar100", {"method": "sigreg", **TINY})
    record = gpu.step_throughput(cfg, compile_encoder=False, channels_last=True, steps=2, device="cpu", warmup=1)
    assert record["method"] == "sigreg" and record["channels_last"] and not record["compile"]
    assert record["images_per_s"] * record["ms_per_step"] / 1e3 == pytest.approx(8)
    assert record["peak_gib"] is None  # no GPU memory on the CPU


def test_cifar_format_files_and_a_short_epoch_on_them(tmp_path):
    root = gpu.write_cifar100_files(tmp_path, n_train=300, n_test=100)
    train, test = read_cifar(root / "cifar-100-python", "cifar100")  # the loader training uses accepts them
    assert train.images.shape == (300, 3, 32, 32) and train.labels.tolist()[:3] == [0, 1, 2]
    overrides = {**SMOKE_OVERRIDES, "data.subset": 0, "data.val_size": 30, "optim.batch_size": 32}
    record = gpu.epoch_wait(root, "cpu", "device", overrides, epochs=1)
    assert record["placement"] == "device" and record["steps"] == 270 // 32 and record["diverged"] is None
    assert 0 < record["data_wait_fraction"] < 1 and record["images_per_s"] > 0


def test_run_checks_and_the_report(tmp_path):
    results = gpu.run_checks(torch.device("cpu"), steps=1, data_images=200, step_overrides=TINY,
                             epoch_overrides={**SMOKE_OVERRIDES, "data.subset": 0, "optim.batch_size": 32},
                             backend="gloo", variants=gpu.STEP_VARIANTS[:2], augment_batch=16)
    assert results["errors"] == {}
    assert [(s["method"], s["channels_last"]) for s in results["steps"]] == [
        ("hamjepa", False), ("hamjepa", True), ("sigreg", False), ("sigreg", True)]
    assert results["augment"]["images_per_s"] > 0 and not results["augment"]["sync_free"]
    assert [e["placement"] for e in results["epochs"]] == ["device", "loader"]
    json_path, table_path = gpu.write_report(results, tmp_path / "out")
    assert json.loads(json_path.read_text())["process_group"]["ok"] is True
    table = table_path.read_text()
    for row in ("| process group | gloo x 2", "| step eager | HamJEPA", "| step channels_last |",
                "| augmentation on the device |", "| epoch, augment on device |", "| epoch, augment on loader |",
                "| host syncs, hamjepa | not measured on the CPU", "| host syncs, sigreg |"):
        assert row in table, row
    assert "error" not in table


def test_a_failing_piece_is_recorded_and_the_rest_runs():
    results = {"errors": {}}
    assert gpu._attempt(results, "boom", lambda: 1 / 0) is None
    assert results["errors"] == {"boom": "ZeroDivisionError: division by zero"}
    assert "| error in boom | ZeroDivisionError: division by zero |" in "\n".join(
        f"| {a} | {b} |" for a, b in gpu._rows(results))


def test_placement_benchmark_times_both_placements_on_the_same_epochs():
    cfg = profile("quick", {**SMOKE_OVERRIDES, "data.dataset": "synthetic", "data.subset": 180,
                            "optim.batch_size": 32})
    figures = step.placement_epochs(cfg, epochs=1)
    assert set(figures) == {"device", "loader"}
    for f in figures.values():
        assert f["images"] == (180 // 32) * 32 and f["images_per_s"] > 0 and 0 < f["data_wait_fraction"] < 1


@pytest.mark.slow
def test_compiled_predictor_and_objective_agree_with_eager_and_are_timed_side_by_side():
    """`bench step --part compile` at tiny sizes: torch.compile of the rollout and the objective gives eager's loss
    and statistics to 1e-5 (compile_steps raises otherwise), and both are timed; minutes of compiling on a CPU."""
    figures = step.compile_steps({**SMOKE_OVERRIDES, "optim.batch_size": 8, "encoder.width": 0.125}, "quick", rounds=2)
    for method in ("hamjepa", "sigreg"):
        assert figures[method]["max_relative_error"] <= 1e-5
        assert figures[method]["eager_s"] > 0 and figures[method]["compiled_s"] > 0 and figures[method]["compile_s"] > 0


def test_bench_help_lists_the_benchmarks_and_exits_0():
    import subprocess
    import sys

    from hamjepa.bench.__main__ import BENCHMARKS

    done = subprocess.run([sys.executable, "-m", "hamjepa.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and all(f"  {name} " in done.stdout for name in BENCHMARKS), done.stderr
    missing = subprocess.run([sys.executable, "-m", "hamjepa.bench"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "benchmarks:" in missing.stderr
