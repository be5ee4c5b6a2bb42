"""The `hamjepa` command: `hamjepa train` runs one logged training; `hamjepa config` prints a resolved config.

Every input is checked before any work, in this order: the flags and the config (no heavy import, so a typo
costs what `hamjepa config` costs), the tracking store and the storage folder, what one run asks of this
machine when Ray is local, then the data files (preflight); only then is Ray connected and MLflow written.
Each refusal (a UserError, hamjepa/errors.py) is one line on stderr, `<prog>: error: <sentence>`, and exit
code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hamjepa import __version__, checks
from hamjepa.arguments import Parser
from hamjepa.backup_log import STATUS_FILE, backup_warning
from hamjepa.config import (
    DATASET_OVERRIDES,
    DATASETS,
    GPU_PROFILES,
    PROFILES,
    SMOKE_OVERRIDES,
    build_config,
    parse_overrides,
)
from hamjepa.errors import UserError
from hamjepa.methods import ABLATIONS
from hamjepa.redact import mask_text, mask_uri
from hamjepa.train.destinations import check_destinations
from hamjepa.train.resources import Resources

# A study's defaults. On CPUs, sized for the quick profile on 2 cores: 4 search trials (ASHA stops some) + 3 paired
# seeds x 2 methods, two runs at a time, ~2.5 minutes a run there (13 minutes in all, 2026-12-03, docs/results.md;
# the goal is 15). Three paired seeds everywhere:
# n = 2 resolves almost nothing (the 95% t-interval's half-width is 12.7 sd / sqrt(2); at n = 3, 4.3 sd / sqrt(3)).
DEFAULT_CPU_TRIALS, DEFAULT_GPU_TRIALS = 4, 6
DEFAULT_SEEDS = 3
TRAIN_EXPERIMENT = "hamjepa-train"  # `hamjepa train`'s MLflow experiment unless --experiment / $MLFLOW_EXPERIMENT_NAME
VERBOSE_HELP = "Ray's own console output too (workers' logs, checkpoints, Tune's every result)"


def add_config_arguments(parser: argparse.ArgumentParser, default_profile: str | None = None) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default=default_profile,
                        help="a named set of overrides on the paper's defaults (quick: 2 CPU cores, minutes)")
    parser.add_argument("--config", help="YAML file with (part of) the config tree; applied after --profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set predictor.steps=3 (repeatable; applied last)")
    parser.add_argument("--data-root", help="folder that holds the dataset (else $HAMJEPA_DATA, Debian's "
                                            "dataset packages, then a download)")


def data_root(path: str) -> str:
    """--data-root made absolute: Ray's workers read it from other working directories."""
    return str(Path(path).expanduser().resolve())


def config_from_args(args: argparse.Namespace):
    overrides = parse_overrides(args.overrides)
    if args.data_root:
        overrides["data.root"] = data_root(args.data_root)
    return build_config(args.profile, args.config, overrides)


def _check_destinations(resources: Resources, args: argparse.Namespace) -> str:
    """The Ray address, experiment, tracking store and storage folder of a run or study (train/destinations.py);
    returns the tracking URI."""
    return check_destinations(resources, address=args.address, experiment=args.experiment,
                              tracking_uri=args.tracking_uri, storage_path=args.storage_path)


def _scale_overrides(args: argparse.Namespace) -> dict[str, object]:
    """--dataset, --epochs, --subset and --data-root as config overrides (the same flags for a run and a study)."""
    overrides: dict[str, object] = {}
    if args.dataset:
        overrides.update({"data.dataset": args.dataset, **DATASET_OVERRIDES.get(args.dataset, {})})
    if args.epochs is not None:
        overrides["optim.epochs"] = args.epochs
    if args.subset is not None:
        overrides["data.subset"] = args.subset
    if args.data_root:
        overrides["data.root"] = data_root(args.data_root)
    return overrides


def _train_defaults(args: argparse.Namespace) -> str:
    """Without --gpus-per-worker: one GPU per worker where this machine has one (and Ray is local). Without --profile
    or --config: the paper's protocol (CIFAR-100, full width) on GPUs, else the quick profile, which trains in
    minutes on CPU cores where the paper's protocol would take days; returns the line that says so."""
    local = not checks.resolve_ray_address(args.address)
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1.0 if local and checks.local_gpus() > 0 else 0.0
    if args.profile is None and args.config is None and args.gpus_per_worker == 0:
        args.profile = "quick"
        return ("hamjepa train: no GPU asked for, so the quick profile (Fashion-MNIST subset, quarter-width ResNet, "
                "minutes on CPU cores); --profile cifar100 --gpus-per-worker 1 trains the paper's protocol.")
    return ""


def _train(args: argparse.Namespace) -> int:
    chosen = _train_defaults(args)
    cfg = build_config(args.profile, args.config, {**_scale_overrides(args), **parse_overrides(args.overrides)})
    checks.integer("--max-failures", args.max_failures, 0)
    checks.run_name("--name", args.name)
    resources = Resources(args.workers, args.cpus_per_worker, args.gpus_per_worker, flag="--workers")
    tracking_uri = _check_destinations(resources, args)
    experiment = args.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or TRAIN_EXPERIMENT

    from hamjepa.names import RunState
    from hamjepa.train import launch  # torch, Ray and MLflow load from here on

    launch.preflight(cfg, resources)
    launch.quiet_logs(args.verbose)  # before the store is first opened: MLflow says when it creates one
    launch.check_rerun(tracking_uri, experiment, args.name, cfg)
    if chosen:  # said once every input passed, so a refusal stays one line
        print(chosen, flush=True)
    launch.connect_ray(args.address, verbose=args.verbose)
    outcome = launch.train_and_log(cfg, resources, experiment=experiment, run_name=args.name,
                                tracking_uri=tracking_uri, storage_path=args.storage_path,
                                max_failures=args.max_failures)
    print(launch.summary(cfg, outcome, tracking_uri))
    if outcome.unrecorded:  # trained, but MLflow does not hold the record: the user must act, so not exit 0
        print(f"hamjepa: error: {mask_text(outcome.unrecorded)}", file=sys.stderr)
        return 1
    return 0 if outcome.status == RunState.FINISHED else 1


def _recover(args: argparse.Namespace) -> int:
    """Write a run's record that its store refused (a recovery file `hamjepa train` named) into a tracking store."""
    from hamjepa.train import run_record  # MLflow and torch load from here on

    record = run_record.load(args.file)
    if args.tracking_uri:  # another store: written like any run's, created where no file is
        record.tracking_uri = checks.resolve_tracking_uri(args.tracking_uri)
        checks.check_tracking_uri(record.tracking_uri)
    else:  # the run's own store must be there: a deleted one is restored from its backup, never recreated empty
        checks.check_readable_tracking_uri(record.tracking_uri)
        checks.check_tracking_uri(record.tracking_uri)
    from hamjepa.store_faults import REFUSED, Guarded

    guarded = Guarded(record.tracking_uri, warn=False)
    if guarded(run_record.write, record) is REFUSED:
        raise UserError(f"{guarded.faults[-1]}; the record stays in {args.file} for the next try.")
    done = f"{args.file}.recovered"
    os.replace(args.file, done)
    print(f"hamjepa: the record of run {record.run_name} ({record.status}, {len(record.epochs)} epoch reports) is in "
          f"{mask_uri(record.tracking_uri)}, experiment '{record.experiment}'; the file is now {done}")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags a training run and a study share: its scale and the resources of one run."""
    parser.add_argument("--epochs", type=int, help="epochs per run (overrides the profile)")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset (sets channels and image size to match)")
    parser.add_argument("--subset", type=int, help="training images (stratified subset; 0 = all)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per run (data-parallel)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)


def _add_study_arguments(parser: argparse.ArgumentParser, name: str, default_profile: str | None) -> None:
    """The flags every study script shares: data and scale, resources, tracking, Ray, resume."""
    add_config_arguments(parser, default_profile=default_profile)
    add_run_arguments(parser)
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 0; 1 with --profile "
                                                              f"{'/'.join(GPU_PROFILES)})")
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0 = as many as fit)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--experiment",
                        help=f"MLflow experiment (default $MLFLOW_EXPERIMENT_NAME, else hamjepa-{name})")
    parser.add_argument("--storage-path", help="Tune/Train state: a folder, or s3://... on a cluster (default "
                                               "$HAMJEPA_STORAGE_PATH, else ./ray_results)")
    parser.add_argument("--address", help="Ray cluster address (e.g. auto); default $RAY_ADDRESS, else a local Ray")
    parser.add_argument("--resume", nargs="?", const="latest", default="", metavar="ID",
                        help="continue this study's latest invocation, or the one with this study id")
    parser.add_argument("--smoke-test", action="store_true", help="tiny everything (CI)")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def _check_resumable(settings, params: dict) -> None:
    """--resume must find what it continues, started with the same config and the same study flags (`params`: the
    study's own, as its runner records them), before Ray starts."""
    from hamjepa.study.invocation import check_resumable

    if settings.resume not in ("", "latest"):
        checks.run_name("--resume", settings.resume)
    check_resumable(settings, params)


def _study_config(args: argparse.Namespace, protocol: dict | None = None):
    """A study's base config. `protocol`: a script's own config overrides (what it means, e.g. the paper's whole
    training split), applied after --smoke-test's sizes, so a smoke run keeps the protocol, and before the flags and
    --set."""
    overrides = {**(SMOKE_OVERRIDES if args.smoke_test else {}), **(protocol or {}), **_scale_overrides(args)}
    return build_config(args.profile, args.config, {**overrides, **parse_overrides(args.overrides)})


def _study_settings(name: str, args: argparse.Namespace, base, **fields):
    """StudySettings from the shared flags, the base config (`_study_config`) and a script's own `fields`, checked
    with the destinations; `_start` then checks --resume and the data and connects Ray."""
    checks.integer("--max-concurrent", args.max_concurrent, 0)
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (
        1.0 if args.profile in GPU_PROFILES else 0.0)
    resources = Resources(args.workers, args.cpus_per_worker, gpus, flag="--workers")
    tracking_uri = _check_destinations(resources, args)

    from hamjepa.study.settings import StudySettings

    if fields.get("num_samples", 0) is None:  # search trials: fewer on CPUs, where each costs minutes
        fields["num_samples"] = DEFAULT_GPU_TRIALS if gpus > 0 else DEFAULT_CPU_TRIALS
    if fields.get("tune_baseline", False) is None:  # both methods tuned alike where the budget allows
        fields["tune_baseline"] = gpus > 0
    return StudySettings(
        name=name, base=base, resources=resources,
        max_concurrent=args.max_concurrent, tracking_uri=tracking_uri,
        experiment=args.experiment or "", storage_path=args.storage_path or "", resume=args.resume,
        verbose=args.verbose, **fields)


def _start(settings, args: argparse.Namespace, params: dict) -> None:
    """The last checks, then Ray: --resume against `params` (the study's own parameters), the data files."""
    from hamjepa.train import launch  # torch, Ray and MLflow load from here on

    _check_resumable(settings, params)
    launch.preflight(settings.base)
    launch.connect_ray(args.address, verbose=args.verbose, worker_logs=False)  # the console is Tune's table
    _warn_about_store_backups()


def _print_result(settings, result) -> int:
    print()
    print(result.text, end="")
    print(f"Browse it: mlflow ui --backend-store-uri {mask_uri(settings.tracking_uri)}  (experiment "
          f"'{settings.experiment_name}', parent run {result.parent_run_id})")
    url = _runs_url(settings, result)
    if url:
        print(f"Its runs: {url}  (`hamjepa report --study {getattr(result, 'study_id', '')}` prints this summary "
              "again)")
    _warn_about_store_backups()
    return 130 if result.interrupted else 0


def _runs_url(settings, result) -> str:
    """The MLflow UI's runs table of the study's experiment; "" where its id is not known without a network call."""
    from hamjepa.study.reopen import runs_url

    experiment = getattr(result, "experiment_id", "")
    if not experiment and not settings.tracking_uri.startswith(("http://", "https://")):
        from mlflow.tracking import MlflowClient

        found = MlflowClient(tracking_uri=settings.tracking_uri).get_experiment_by_name(settings.experiment_name)
        experiment = found.experiment_id if found else ""
    return runs_url(settings.tracking_uri, experiment) if experiment else ""


# On a cluster's head, cluster/mlflow_store.py records every backup of the MLflow store here; a study says so
# when the last one failed or the backup loop stopped, where its user looks (not only in that log).
BACKUP_STATUS = Path.home() / "mlflow" / STATUS_FILE


def _warn_about_store_backups(status_file: Path | None = None) -> str | None:
    try:
        warning = backup_warning(status_file or BACKUP_STATUS)  # None where there is no log: not a cluster head
    except Exception:  # noqa: BLE001 - a warning about backups must never stop a study
        return None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return warning


def _guarded(parser: argparse.ArgumentParser, work, tracking_uri: str | None) -> int:
    from hamjepa.store_faults import describe, from_store

    try:
        return work()
    except UserError as error:
        print(f"{parser.prog}: error: {mask_text(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # one that got past the phases: the study's runs are closed, resumable
        print(f"{parser.prog}: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    except Exception as error:
        if not from_store(error):
            raise
        # The trials logged through Guarded writes and trained on; the study's own writes (its summary, its parent
        # run) need the store, so the study stops here, its runs' checkpoints kept for --resume.
        fault = describe(checks.resolve_tracking_uri(tracking_uri), error)
        print(f"{parser.prog}: error: {mask_text(fault)}, so the study stopped before its record was complete; its "
              "runs keep their checkpoints: once the store takes writes, run the same command with --resume to "
              "finish it (`hamjepa report` lists what is missing).", file=sys.stderr)
        return 1


def _seeds(text: str) -> tuple[int, bool]:
    """--seeds: (most paired seeds, sequential) from `N` or `auto[:MAX]`."""
    from hamjepa.report.sequential import DEFAULT_MAX

    if text == "auto" or text.startswith("auto:"):
        most = text.removeprefix("auto").removeprefix(":") or str(DEFAULT_MAX)
        if not most.isdigit():
            raise argparse.ArgumentTypeError(f"--seeds = {text!r} is invalid: write auto or auto:MAX, e.g. auto:10")
        return int(most), True
    try:
        return int(text), False
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds = {text!r} is invalid: write a number of paired seeds, e.g. 3, "
                                         "or auto[:MAX]") from None


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The search: its space (data), the metric it selects on, where its Optuna study lives."""
    parser.add_argument("--space", metavar="FILE", help="the search space: a YAML file of dotted config keys to "
                        "uniform(LOW, HIGH), loguniform(LOW, HIGH), int(LOW, HIGH[, STEP]) or choice(A, B, ...) "
                        "(default: the study script's own YAML)")
    parser.add_argument("--search", action="append", default=[], metavar="KEY=DIST",
                        help="add or replace one dimension, e.g. --search 'predictor.hidden_dim=choice(128, 256)' "
                             "(repeatable)")
    parser.add_argument("--freeze", action="append", default=[], metavar="KEY",
                        help="stop searching KEY: it keeps the config's value (or --set's) (repeatable)")
    parser.add_argument("--objective", default="", metavar="METRIC",
                        help="the validation metric the search selects on (default val_knn{k}_top1, measured every "
                             "epoch; val_linprobe_top1 is measured after the last epoch only, so it needs "
                             "--no-early-stopping)")
    parser.add_argument("--optuna-storage", default="", metavar="URL",
                        help="the live Optuna study's RDB storage, e.g. postgresql://... (default: sqlite optuna.db in "
                             "the study's folder); optuna-dashboard URL watches the search")


def _space(default, args: argparse.Namespace, base):
    """The study's search space: --space (else the script's), --freeze, --search; checked against the base config,
    and --set on a searched key refused, before any work."""
    from hamjepa.study.space import SearchSpace

    space = default if isinstance(default, SearchSpace) else None
    if args.space or space is None:
        space = SearchSpace.from_file(args.space or default)
    space = space.frozen(args.freeze).searching(args.search)
    space.refuse_overrides(parse_overrides(args.overrides))
    space.check(base)
    return space


def study_main(name: str, space, argv: list[str] | None = None, initial_points: list[dict] | None = None) -> int:
    """Command line of a search study (studies/<name>.py): parse, validate, run, print the summary.

    `space`: the study's default search space, a YAML file's path or a SearchSpace (`--space` replaces it)."""
    parser = Parser(prog=f"python studies/{name}.py",
                    description=f"HamJEPA study '{name}': Ray Tune + Optuna, SIGReg baselines, MLflow.")
    _add_study_arguments(parser, name, default_profile="quick")
    _add_search_arguments(parser)
    parser.add_argument("--num-samples", type=int, help="HamJEPA trials Optuna proposes (default 4 on CPUs, 6 on "
                                                           "GPUs; smoke 2)")
    parser.add_argument("--seeds", type=_seeds,
                        help="paired seeds: the selected HamJEPA configuration and SIGReg are each trained on this "
                             "many fresh seeds and compared seed by seed (default 3; smoke 2); auto[:MAX] adds seeds "
                             "in looks (3, 6, 10, ...) until the primary is resolved, at most MAX (default 10)")
    parser.add_argument("--ablation", choices=list(ABLATIONS), default="",
                        help="also train this ablation with the selected configuration (mlp: MLP-HJEPA)")
    parser.add_argument("--primary", default="",
                        help="the primary metric, declared before the study: the only row with a verdict word "
                             "(default test kNN@k, test_knn20_top1; or test_linprobe_top1)")
    parser.add_argument("--tune-baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="give SIGReg its own search with the same budget, scheduler and selection rule (default: "
                             "on with GPUs; off on CPUs, where its 4 trials would add about 10 minutes to the quick "
                             "study)")
    parser.add_argument("--reference", type=int, default=None,
                        help="encoders evaluated at initialisation (never trained) that each method's gain is tested "
                             "against: learned = final mean above theirs, Welch one-sided 5% (default 10; smoke 3; "
                             "0 = none, gains from each run's own epoch 0)")
    parser.add_argument("--no-early-stopping", action="store_true", help="switch ASHA off")
    parser.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    args = parser.parse_args(argv)

    def work() -> int:
        checks.integer("--seed", args.seed, 0, checks.MAX_SEED)
        trials = args.num_samples if args.num_samples is not None else (2 if args.smoke_test else None)
        seeds, sequential = args.seeds if args.seeds is not None else (2 if args.smoke_test else DEFAULT_SEEDS, False)
        base = _study_config(args)
        searched = _space(space, args, base)
        settings = _study_settings(name, args, base, num_samples=trials, seeds=seeds, sequential=sequential,
                                   ablation=args.ablation,
                                   early_stopping=not args.no_early_stopping, seed=args.seed, primary=args.primary,
                                   tune_baseline=args.tune_baseline,
                                   reference=args.reference if args.reference is not None else
                                   (3 if args.smoke_test else 10), objective=args.objective,
                                   optuna_storage=args.optuna_storage)
        from hamjepa.study.settings import search_params

        _start(settings, args, search_params(settings, searched))
        from hamjepa.study.runner import run_study

        return _print_result(settings, run_study(settings, searched, initial_points))

    return _guarded(parser, work, args.tracking_uri)


def reproduce_main(argv: list[str] | None = None) -> int:
    """Command line of studies/reproduce_paper.py: the paper's comparison as fixed runs, then its table."""
    parser = Parser(prog="python studies/reproduce_paper.py",
                    description="The paper's CIFAR-100 comparison: SIGReg, HamJEPA (q, p, qp readouts) and MLP-HJEPA "
                                "on the same seeds, beside the paper's numbers. Use --epochs 80 for the paper's "
                                "longer schedule.")
    _add_study_arguments(parser, "reproduce_paper", default_profile=None)
    parser.add_argument("--seeds", type=int, help="seeds per method (default 3, as in the paper; smoke 1)")
    args = parser.parse_args(argv)
    if args.profile is None:  # the paper's protocol; a smoke test stays offline and tiny
        args.profile = "quick" if args.smoke_test else "cifar100"

    def work() -> int:
        from hamjepa.study.reproduce import reproduction_params, run_reproduction

        seeds = args.seeds if args.seeds is not None else (1 if args.smoke_test else 3)
        if seeds < 1:
            raise UserError(f"--seeds = {seeds} is invalid: must be an integer >= 1.")
        # The paper's protocol: train, and take kNN neighbours, on the whole training split (docs/method.md §10).
        base = _study_config(args, protocol={"data.val_size": 0})
        settings = _study_settings("reproduce_paper", args, base, seeds=seeds, early_stopping=False, searches=False,
                                   reference=0)
        _start(settings, args, reproduction_params(settings))
        return _print_result(settings, run_reproduction(settings))

    return _guarded(parser, work, args.tracking_uri)


def _print_config(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_yaml(), end="")
    return 0


def _store_to_read(args: argparse.Namespace) -> str:
    """The checked tracking URI (and --experiment) of `hamjepa report` / `hamjepa studies`."""
    checks.experiment_name("--experiment", args.experiment)
    tracking_uri = checks.resolve_tracking_uri(args.tracking_uri)
    checks.check_readable_tracking_uri(tracking_uri)
    return tracking_uri


def _report(args: argparse.Namespace) -> int:
    if args.study is not None:
        checks.run_name("--study", args.study)
    tracking_uri = _store_to_read(args)

    from hamjepa.study.reopen import report  # MLflow loads from here on

    print(report(tracking_uri, args.study, args.experiment), end="")
    return 0


def _studies(args: argparse.Namespace) -> int:
    tracking_uri = _store_to_read(args)

    from hamjepa.study.reopen import studies_table  # MLflow loads from here on

    table = studies_table(tracking_uri, args.experiment)
    print(table, end="")
    if not table:  # stdout stays empty for scripts; a person reads why
        print(f"hamjepa: no study in '{mask_uri(tracking_uri)}' yet", file=sys.stderr)
    return 0


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--experiment", help="only this MLflow experiment (default: every experiment)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hamjepa", description="HamJEPA vs SIGReg studies on Ray + MLflow.")
    parser.add_argument("--version", action="version", version=f"hamjepa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one HamJEPA / SIGReg / MLP-HJEPA run under Ray Train")
    add_config_arguments(train)
    add_run_arguments(train)
    train.add_argument("--gpus-per-worker", type=float, help="> 0 trains on GPUs with NCCL (default: 1 where this "
                                                             "machine has a GPU and Ray is local, else 0)")
    train.add_argument("--address", help="Ray cluster address (e.g. auto); default $RAY_ADDRESS, else a local Ray")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                              "sqlite:///mlflow.db)")
    train.add_argument("--experiment", help=f"MLflow experiment name (default $MLFLOW_EXPERIMENT_NAME, else "
                                            f"{TRAIN_EXPERIMENT})")
    train.add_argument("--name", help="run name; rerunning a name resumes it from its last checkpoint")
    train.add_argument("--storage-path", help="where Ray Train keeps checkpoints (default "
                                              "$HAMJEPA_STORAGE_PATH, else ./ray_results; s3://... on a cluster)")
    train.add_argument("--max-failures", type=int, default=2, help="worker crashes survived per run")
    train.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    train.set_defaults(run=_train)

    show = commands.add_parser("config", help="print the resolved config as YAML")
    add_config_arguments(show)
    show.set_defaults(run=_print_config)

    report = commands.add_parser("report", help="rebuild a finished or interrupted study's summary from MLflow "
                                                "alone, and say which of its runs are missing")
    which = report.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="ID", help="a study id (as `hamjepa studies` lists it) or its parent run id")
    which.add_argument("--latest", action="store_true", help="the newest study (the default)")
    _add_store_arguments(report)
    report.set_defaults(run=_report)

    recover = commands.add_parser("recover", help="write a run's record that its tracking store refused mid-run "
                                                  "(the recovery file `hamjepa train` named) once the store is back")
    recover.add_argument("file", help="the recovery file (hamjepa-record-<run>.json)")
    recover.add_argument("--tracking-uri", help="write into this store instead of the run's own (e.g. when that one "
                                                "is lost)")
    recover.set_defaults(run=_recover)

    studies = commands.add_parser("studies", help="list the studies in a tracking store: id, start, status, trial "
                                                  "runs, verdict")
    _add_store_arguments(studies)
    studies.set_defaults(run=_studies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:  # our one-sentence errors (ConfigError too): no traceback for a bad input
        print(f"hamjepa: error: {mask_text(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hamjepa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
