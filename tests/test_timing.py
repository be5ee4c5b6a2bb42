"""Where a study's time went: phases' wall time and the parts of its runs, with their shares."""

import pytest

from hamjepa import names
from hamjepa.report.summary import RunRecord
from hamjepa.report.timing import lines, phase_metric, phases_from_metrics, run_parts


def _run(**seconds):
    metrics = {names.time_metric(part): value for part, value in seconds.items()}
    return RunRecord("r", "r", "compare", "hamjepa", "finished", "", {}, metrics)


def test_run_parts_sum_each_runs_totals_and_lines_give_shares():
    parts = run_parts([_run(train=60.0, eval_final=20.0), _run(train=100.0, startup=20.0), _run()])
    assert parts["train"] == 160.0 and parts["eval_final"] == 20.0 and parts["startup"] == 20.0
    assert sum(parts.values()) == 200.0 and set(parts) == set(names.TIME_PARTS)
    phase_line, run_line = lines({"search": 300.0, "compare": 600.0}, parts)
    assert phase_line == "Wall time (this invocation): search 5.0 min (33%), compare 10.0 min (67%); 15.0 min in all."
    assert run_line == ("Inside the runs (3.3 run-minutes, every run together): training 80%, start-up 10%, "
                        "final evaluation 10%.")  # largest first; parts that took no time left out
    assert lines({}, dict.fromkeys(names.TIME_PARTS, 0.0)) == []


def test_phase_seconds_round_trip_through_the_parent_runs_metrics():
    metrics = {phase_metric("search"): 12.5, phase_metric("search-baseline"): 3.0, "delta_x": 1.0}
    assert phases_from_metrics(metrics) == {"search": 12.5, "search-baseline": 3.0}


def test_an_unknown_time_part_is_refused():
    with pytest.raises(ValueError, match="time part 'eval' is unknown"):
        names.time_metric("eval")
