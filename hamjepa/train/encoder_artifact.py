"""A trained encoder as an MLflow artifact anyone can load without Ray: its weights and the config that built it.

A finished comparison run (and every `hamjepa train` run) logs `model/encoder.pt`, taken from the run's newest
usable checkpoint (checkpoints.py). To use it downstream:

    from hamjepa.train.encoder_artifact import load_encoder
    encoder, cfg = load_encoder(mlflow.artifacts.download_artifacts(run_id=..., artifact_path="model/encoder.pt"))
    z = encoder(images)  # (N, 2d) states, (q, p) halves for HamJEPA; normalise images as cfg.data says

Weights only (loaded with `weights_only=True`): no pickled code travels with the file.

The same encoder is also an MLflow logged model named `encoder` (MLflow 3's Models tab; `mlflow.search_logged_models`
finds it), saved by `mlflow.pytorch` as a torch.export program (`serialization_format="pt2"`: loading it runs
no pickle, unlike MLflow's default), with an input example and the signature inferred from it, and `encoder.pt`
inside as an extra file:

    model = mlflow.pytorch.load_model(f"models:/{model_id}")   # z = model(images), images (N, C, H, W) float32
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hamjepa import storage
from hamjepa.config import Config
from hamjepa.method.encoder import TokenEncoder
from hamjepa.redact import mask_uri
from hamjepa.train import checkpoints

ARTIFACT_DIR = "model"
FILE = "encoder.pt"
PLOTS_DIR = "plots"  # a run's pictures
PREFIX = "encoder."  # the encoder's keys in JEPAModel's state dict


def payload(state: dict[str, Any]) -> dict[str, Any]:
    """The encoder's weights and the run's config from a training state."""
    weights = {k.removeprefix(PREFIX): v for k, v in state["model"].items() if k.startswith(PREFIX)}
    return {"encoder": weights, "config": state["config"], "epoch": state.get("epoch")}


def load_encoder(path: str, device: torch.device | str = "cpu") -> tuple[TokenEncoder, Config]:
    """The trained encoder (eval mode) and its run's config from an `encoder.pt` artifact."""
    saved = torch.load(path, map_location=device, weights_only=True)
    cfg = Config.from_dict(saved["config"])
    encoder = TokenEncoder(cfg.encoder).to(device)
    encoder.load_state_dict(saved["encoder"])
    return encoder.eval(), cfg


def newest_state(run_folder: str, cfg: Config) -> dict[str, Any]:
    """The newest usable checkpoint's state of the Ray Train run stored in `run_folder` (a folder or URI)."""
    fs, inner = storage.filesystem(run_folder)
    names = checkpoints.folder_names(fs, inner)
    if not names:
        raise checkpoints.CheckpointError(f"no checkpoint under {run_folder}")
    candidates = [f"{inner}/{name}" for name in names]
    return checkpoints.read_newest_usable(candidates, cfg.to_dict(), "cpu", fetch=lambda path: _Fetched(fs, path))


class _Fetched:
    """A checkpoint folder on any pyarrow filesystem, copied to a local temporary folder while in use."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def __enter__(self) -> str:
        import tempfile

        import pyarrow.fs

        self.local = tempfile.TemporaryDirectory(prefix="hamjepa-checkpoint-")
        pyarrow.fs.copy_files(self.path, self.local.name, source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return self.local.name

    def __exit__(self, *exc) -> bool:
        self.local.cleanup()
        return False


def log_run_artifacts(logger, run_folder: str, cfg: Config, encoder: bool = True) -> str | None:
    """Log a finished run's pictures (plots/, e.g. a HamJEPA run's flow.png), its trained encoder (with
    `encoder`) and its checkpoint folder on `logger`'s MLflow run; None, or the reason it could not (the run's
    record stands without them)."""
    import tempfile

    logger.set_tags({"hamjepa.checkpoint": mask_uri(run_folder)})
    try:
        state = newest_state(run_folder, cfg)
    except (checkpoints.CheckpointError, OSError) as error:
        return str(error)
    if "model" not in state:  # a diverged run's checkpoint holds its report, not weights
        return "no trained weights in its checkpoint"
    with tempfile.TemporaryDirectory() as folder:
        for name, png in state.get("pictures", {}).items():
            path = os.path.join(folder, name)
            with open(path, "wb") as stream:
                stream.write(png.numpy().tobytes())
            logger.log_artifact(path, PLOTS_DIR)
        if encoder:
            path = os.path.join(folder, FILE)
            saved = payload(state)
            torch.save(saved, path)
            logger.log_artifact(path, ARTIFACT_DIR)
            return log_encoder_model(logger, saved, cfg, path)
    return None


MODEL_NAME = "encoder"  # the logged model's name


def log_encoder_model(logger, saved: dict[str, Any], cfg: Config, encoder_file: str) -> str | None:
    """The trained encoder as an MLflow logged model of `logger`'s run (its experiment's artifact location holds
    it); None, or the reason it could not be logged (the run keeps `model/encoder.pt` either way)."""
    import tempfile

    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput

    from hamjepa.tracking import experiment_id

    encoder = TokenEncoder(cfg.encoder)
    encoder.load_state_dict(saved["encoder"])
    example = torch.zeros(2, cfg.encoder.in_channels, cfg.data.image_size, cfg.data.image_size)  # (N, C, H, W)
    try:
        client = logger.client
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, MODEL_NAME)
            # Requirements named, not inferred: inference imports the model in a subprocess (seconds per model).
            mlflow.pytorch.save_model(encoder.eval(), path, serialization_format="pt2", input_example=example.numpy(),
                                      extra_files=[encoder_file], pip_requirements=[f"torch=={torch.__version__}"])
            model = client.create_logged_model(experiment_id(client, logger.experiment), name=MODEL_NAME,
                                               source_run_id=logger.run_id, model_type="encoder",
                                               tags={"hamjepa.method": cfg.method})
            client.log_model_artifacts(model.model_id, path)
            client.finalize_logged_model(model.model_id, "READY")
            client.log_outputs(logger.run_id, [LoggedModelOutput(model.model_id, step=cfg.optim.epochs)])
    except Exception as error:  # noqa: BLE001 - an export problem must not fail a finished run
        run = getattr(logger, "run_id", None)
        print(f"warning: the encoder of run {run} was not logged as an MLflow model ({error})", flush=True)
        return f"not logged as an MLflow model: {error}"
    return None
