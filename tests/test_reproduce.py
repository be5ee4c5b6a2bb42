"""studies/reproduce_paper.py: the paper's table from MLflow's runs, and its smoke run end to end."""

import csv
import io
import statistics
from pathlib import Path

import pytest
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from hamjepa.cli import reproduce_main
from hamjepa.config import profile
from hamjepa.report.paper import PAPER_ROWS, reference_row
from hamjepa.report.summary import RunRecord
from hamjepa.study.reproduce import PHASE, build_table, to_csv, to_markdown


def _record(method, seed, knn, probe, status="finished"):
    metrics = {"test_knn20_top1": knn}
    for readout, shift in (("q", 0.0), ("p", 1.0), ("qp", 2.0)):
        metrics[f"test_knn20_top1_{readout}"] = knn + shift
        metrics[f"test_linprobe_top1_{readout}"] = probe + shift
    return RunRecord(f"{method}-{seed}", f"{PHASE}-{method}-{seed}", PHASE, method, status, "", {}, metrics)


def test_table_is_mean_and_std_over_seeds_with_the_papers_row_below_ours():
    records = [_record("sigreg", s, 20.0 + s, 25.0 + s) for s in range(3)]
    records += [_record("hamjepa", s, 30.0 + 2 * s, 33.0) for s in range(3)]
    records += [_record("mlp", s, 10.0, 11.0) for s in range(2)]
    records += [_record("mlp", 2, 0.0, 0.0, status="diverged")]
    base = profile("cifar100")  # 30 epochs: the paper's first row
    table = build_table(records, base, seeds=3)

    assert [row.source for row in table.rows] == ["ours", "paper", "ours", "paper"]
    ours, paper, ours_mlp, paper_mlp = table.rows
    knn, probe = ours.cells["SIGReg"]  # SIGReg's column is its full vector (qp = +2 in these records)
    assert (knn.n, knn.mean) == (3, 23.0) and probe.mean == pytest.approx(28.0)
    assert ours.cells["HamJEPA q"][0].std == pytest.approx(statistics.stdev([30.0, 32.0, 34.0]))
    assert ours.cells["HamJEPA p"][0].mean == pytest.approx(33.0)
    assert paper.label == "paper: CIFAR-100, 30 ep, 3 seeds"
    assert paper.cells["HamJEPA q"][0].mean == 31.45 and paper.cells["SIGReg"][1].mean == 30.43
    assert "SIGReg" not in ours_mlp.cells and ours_mlp.cells["HamJEPA qp"][0].n == 2  # the diverged seed is out
    assert "80 ep" in paper_mlp.label and "nearest schedule" in paper_mlp.label  # MLP-HJEPA: 80 epochs only

    text = to_markdown(table, seeds=3)
    assert "| ours: CIFAR-100, 30 ep, 3 seeds | 23.00 +/- 1.00 / 28.00 +/- 1.00 | 32.00 +/- 2.00 / 33.00" in text
    paper_line = "| paper: CIFAR-100, 30 ep, 3 seeds | 26.56 / 30.43 | 31.45 / 33.95 | 29.71 / 33.07 | 30.88 / 34.18 |"
    assert paper_line in text
    assert "(n=2)" in text  # fewer seeds than asked for shows
    assert "ours +9.00 points, paper +4.89" in text  # HamJEPA q 32 - SIGReg qp 23
    assert "reproduce-mlp-2 (diverged)" in text
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert {r["source"] for r in rows} == {"ours", "paper"}
    assert next(r for r in rows if r["column"] == "HamJEPA q" and r["source"] == "ours"
                and r["metric"] == "test_knn20_top1")["mean"] == "32.0000"


def test_paper_rows_are_matched_by_dataset_and_schedule():
    assert reference_row("hamjepa", "cifar100", 80) == (PAPER_ROWS[1], "")
    assert reference_row("mlp", "cifar100", 80) == (PAPER_ROWS[2], "")
    row, caveat = reference_row("hamjepa", "imagefolder", 45)
    assert caveat == "" and row.sigreg_readout == "q"  # the paper's ImageNet SIGReg numbers are of the q half
    row, caveat = reference_row("hamjepa", "fashion_mnist", 3)
    assert row is PAPER_ROWS[0] and "another dataset" in caveat
    assert PAPER_ROWS[0].cells["q"][0] - PAPER_ROWS[0].cells["sigreg"][0] == pytest.approx(4.89)  # docs/method.md §8
    assert PAPER_ROWS[1].cells["q"][0] - PAPER_ROWS[1].cells["sigreg"][0] == pytest.approx(6.45)


@pytest.mark.parametrize("epochs", [45, 100])
def test_imagenet_sigreg_column_reads_the_q_half_like_the_papers(epochs):
    records = [_record("sigreg", 0, 20.0, 25.0), _record("hamjepa", 0, 30.0, 33.0)]
    base = profile("imagenet100", {"optim.epochs": epochs})
    table = build_table(records, base, seeds=1)
    sigreg_knn = table.rows[0].cells["SIGReg"][0]
    assert (sigreg_knn.n, sigreg_knn.mean) == (1, 20.0)  # q (+0), not qp (+2), at any schedule
    assert table.rows[1].cells["SIGReg"][0].mean == 20.10


def test_seeds_must_be_positive(capsys, tmp_path):
    argv = ["--seeds", "0", "--smoke-test", "--storage-path", str(tmp_path), "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db"]
    assert reproduce_main(argv) == 2
    assert "--seeds = 0 is invalid" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_reproduction_logs_every_run_and_prints_every_row(ray_cluster, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--smoke-test", "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"), "--address", ray_cluster]
    assert reproduce_main(argv) == 0
    printed = capsys.readouterr().out

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("hamjepa-reproduce_paper").experiment_id])
    parent = next(r for r in runs if r.data.tags["hamjepa.role"] == "study")
    children = [r for r in runs if r.data.tags["hamjepa.role"] == "trial"]
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.tags["hamjepa.method"] for c in children) == ["hamjepa", "mlp", "sigreg"]
    assert all(c.info.status == "FINISHED" and c.data.params["optim.epochs"] == "2" for c in children)
    # the paper's protocol: the whole training split, so no validation split and no validation metric
    assert all(c.data.params["data.val_size"] == "0" and "val_knn20_top1" not in c.data.metrics
               for c in children)
    assert {"paper_table.md", "paper_table.csv", "paper_comparison.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}

    table = Path(client.download_artifacts(parent.info.run_id, "paper_table.md", str(tmp_path))).read_text()
    assert table in printed
    lines = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| paper")]
    assert len(lines) == 4  # SIGReg/HamJEPA and MLP-HJEPA, ours and the paper's
    sigreg = next(c for c in children if c.data.tags["hamjepa.method"] == "sigreg")
    hamjepa = next(c for c in children if c.data.tags["hamjepa.method"] == "hamjepa")
    assert lines[0].startswith(f"| ours: Fashion-MNIST ({tiny_config().data.subset} images), 2 ep, 1 seed | "
                               f"{sigreg.data.metrics['test_knn20_top1_qp']:.2f} / "
                               f"{sigreg.data.metrics['test_linprobe_top1_qp']:.2f} | "
                               f"{hamjepa.data.metrics['test_knn20_top1_q']:.2f} / ")
    assert lines[1].startswith("| paper: CIFAR-100, 30 ep, 3 seeds (another dataset")
    assert lines[2].count(" / ") == 3 and lines[3].count(" / ") == 3  # MLP-HJEPA fills q, p, qp
