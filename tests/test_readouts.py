"""Which readout a method's unsuffixed metrics mean (no model needed: the naming decision alone)."""

from hamjepa.evaluation.readouts import with_default_readout

VALUE = {"q": 1.0, "p": 2.0, "qp": 3.0}


def _suffixed(readouts):
    names = ["val_knn20_top1", "val_linprobe_top1", "test_knn20_top1", "test_linprobe_top5", "effective_rank"]
    return {f"{name}_{r}": VALUE[r] for name in names for r in readouts}


def test_hamjepa_unsuffixed_metrics_are_its_q_readout_and_the_objective_keeps_its_own_definition():
    metrics = _suffixed(("q", "p", "qp"))
    out = with_default_readout(metrics, "hamjepa", k=20)
    assert out["test_knn20_top1"] == 1.0 and out["val_linprobe_top1"] == 1.0 and out["test_linprobe_top5"] == 1.0
    assert "val_knn20_top1" not in out  # the objective: the per-epoch bounded kNN, reported by the loop, not this
    assert "effective_rank" not in out  # spectra are always per readout
    assert all(out[key] == value for key, value in metrics.items())  # the suffixed ones stay


def test_sigreg_unsuffixed_metrics_are_its_whole_state():
    out = with_default_readout(_suffixed(("qp", "q", "p")), "sigreg", k=20)
    assert out["test_knn20_top1"] == 3.0 and out["val_linprobe_top1"] == 3.0


def test_the_objectives_name_follows_k():
    out = with_default_readout({"val_knn5_top1_q": 9.0, "val_knn20_top1_q": 8.0}, "hamjepa", k=5)
    assert "val_knn5_top1" not in out and out["val_knn20_top1"] == 8.0  # only kNN@k is the objective
