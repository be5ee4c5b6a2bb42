"""A study's initialisation reference: `settings.reference` untrained encoders evaluated once, as Ray tasks with a
trial worker's resources, and logged as one child run (phase `reference`) that the summary tests each method's
gain against (report/reference.py; docs/method.md §11 "Learning").

Only evaluation, no training: the encoders are spread over as many tasks as trial workers fit at once. A resumed
study reuses a finished reference run; one cut short is evaluated again, its metrics logged only once all are in,
so no step is ever logged twice. A reference that fails is recorded as failed and the study goes on (its gains are
then measured against each run's own epoch 0, and the summary says so).
"""

from __future__ import annotations

import time

from hamjepa import provenance
from hamjepa.names import RunState
from hamjepa.report.reference import COMPARED, REFERENCE, metric_key
from hamjepa.study.driver import first_line
from hamjepa.study.invocation import Invocation
from hamjepa.study.phases import cluster_concurrency
from hamjepa.tracking import PHASE_TAG, REASON_TAG, ROLE_TAG, STATUS_TAG, RunLogger


def run_reference(study: Invocation) -> None:
    """Evaluate and log the initialisation reference, unless the study has none (or compares nothing), has one
already, or was interrupted."""
    from hamjepa.train.reference import reference_seeds

    settings = study.settings
    if not (settings.reference and settings.seeds) or study.interrupted or study.phase_done(REFERENCE, 1):
        return
    seeds = reference_seeds(settings.reference)
    tasks = min(len(seeds), cluster_concurrency(settings) * settings.resources.workers)
    print(f"\n[{study.study_id}] {REFERENCE}: {len(seeds)} encoders at initialisation (seeds {seeds[-1]}-{seeds[0]}, "
          f"never trained), evaluated like a run's epoch 0 in {tasks} task(s): what 'learned' is measured against.",
          flush=True)
    logger = RunLogger(settings.tracking_uri, settings.experiment_name, key=f"{study.study_id}/{REFERENCE}",
                       run_name=REFERENCE, parent_run_id=study.parent_id,
                       tags={ROLE_TAG: REFERENCE, PHASE_TAG: REFERENCE, **provenance.tags()})
    logger.set_tags({STATUS_TAG: RunState.RUNNING.value})
    logger.log_params({"reference.n": len(seeds), "reference.seeds": ",".join(map(str, seeds)),
                       **settings.base.flatten()})
    started = time.perf_counter()
    try:
        values = _evaluate(settings, seeds, tasks)
    except KeyboardInterrupt:
        study.interrupted = True
        logger.set_tags({STATUS_TAG: RunState.FAILED.value, REASON_TAG: "interrupted"})
        logger.finish("KILLED")
        return
    except Exception as error:  # noqa: BLE001 - recorded; the study goes on without a reference
        logger.set_tags({STATUS_TAG: RunState.FAILED.value, REASON_TAG: first_line(error)})
        logger.finish("FAILED")
        print(f"[{study.study_id}] {REFERENCE} failed ({first_line(error)}); gains are measured against each "
              "run's own epoch 0.", flush=True)
        return
    finally:
        study.phase_seconds[REFERENCE] = time.perf_counter() - started
    for step in range(len(seeds)):
        logger.log_metrics({metric_key(method, name): value for method in COMPARED
                            for name, value in values[method][step].items()}, step=step)
    logger.set_tags({STATUS_TAG: RunState.FINISHED.value})
    logger.delete_tag(REASON_TAG)  # an interrupted reference evaluated again by --resume: "interrupted" is past
    logger.finish("FINISHED")


def _evaluate(settings, seeds: list[int], tasks: int) -> dict[str, list[dict[str, float]]]:
    """method -> per-seed metrics, from `tasks` Ray tasks of one trial worker's resources each."""
    import ray

    from hamjepa.train.reference import initialisation_readouts

    resources = settings.resources
    device = "cuda" if resources.use_gpu else "cpu"
    remote = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
                        max_retries=1)(initialisation_readouts)
    size = -(-len(seeds) // tasks)  # consecutive chunks: the tasks' results, concatenated, are in seed order
    chunks = [seeds[start:start + size] for start in range(0, len(seeds), size)]
    results = ray.get([remote.remote(settings.base, chunk, COMPARED, device) for chunk in chunks])
    return {method: [metrics for result in results for metrics in result[method]] for method in COMPARED}

