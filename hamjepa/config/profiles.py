"""Where a run's config comes from: the defaults, then a profile, then a YAML file, then dotted overrides.

The defaults are the tree in sections.py (the single source); a profile is a named set of dotted overrides on
it, so a profile can never introduce a knob the tree does not have. YAML is read strictly (a key written
twice is an error) and safely (`yaml.SafeLoader`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hamjepa import paths
from hamjepa.config.sections import Config
from hamjepa.config.tree import ConfigError, StrictLoader, fail, set_dotted, unknown_key, yaml_problem
from hamjepa.errors import UserError


def read_yaml_file(path: str | Path, what: str = "config file",
                   fix: str = "pass the path of a YAML config file") -> Any:
    """The YAML in a file (UTF-8), read strictly; one sentence naming it as `what` when it is missing, not a regular
    file, unreadable, not text or not YAML (`fix`: what to pass instead). Every YAML file a user names is read here."""
    path = Path(path)
    try:  # a named pipe would block the read below until a writer came; a device could stream forever
        paths.require(what, path, "a regular file", fix)
    except UserError as error:
        raise ConfigError(str(error)) from None
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{what} '{path}' cannot be read ({error.strerror or type(error).__name__}); check "
                          "its permissions.") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}); save it as UTF-8 YAML.") from None
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {yaml_problem(error)}.") from None


# -- profiles ----------------------------------------------------------------------------------------
# A profile is a named set of dotted overrides on the defaults above. "quick" fits 2 CPU cores: a
# Fashion-MNIST subset and a quarter-width ResNet, sized from measurements so that both methods learn
# measurably (a random ResNet is already a ~74% kNN classifier on Fashion-MNIST): 4,500 training images,
# batch 64 (70 steps per epoch), 4 epochs = 280 steps at lr 4e-3. The step count is the one both methods were
# shown to learn at (batch 128 x 8 epochs: HamJEPA +3 to +4 test kNN@20 over its initialisation, SIGReg +4);
# the batch was halved so that a run sees half the images and the default study fits 15 minutes. Both still
# learn, kNN less than before: over their initialisation on seeds 1 and 2, HamJEPA +2.3 and +0.8 test kNN@20,
# +4.6 and +4.8 linear probe; SIGReg +2.5 and +1.3, +5.4 and +6.0 (docs/results.md). Fewer steps do not work:
# at batch 128 x 4 epochs (140 steps) HamJEPA ended below its initialisation on kNN (-0.8), and at width 0.125
# (twice the speed) 3 to 6 points below, while SIGReg learned in both. One run is ~1.5 minutes of training on
# one core (~200 images/s) plus its evaluations. "cifar100" is the paper's protocol.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "data.dataset": "fashion_mnist", "data.image_size": 28, "data.subset": 4500, "data.num_workers": 1,
        "encoder.in_channels": 1, "encoder.width": 0.25, "encoder.token_dim": 16,
        "optim.batch_size": 64, "optim.epochs": 4, "optim.warmup_epochs": 1, "optim.lr": 4e-3,
        "predictor.residual_scale_warmup_epochs": 1,
        "eval.probe_epochs": 10, "eval.knn_train_limit": 2000, "eval.spectrum_samples": 2000,
    },
    "cifar100": {"data.dataset": "cifar100", "data.image_size": 32, "encoder.in_channels": 3},
    "imagenet100": {
        "data.dataset": "imagefolder", "data.image_size": 224, "encoder.in_channels": 3,
        "encoder.stem": "imagenet", "encoder.token_hw": 8, "optim.epochs": 45,
        "augment.crop_scale_min": 0.4, "augment.blur_kernel": 23,
    },
}
# Profiles sized for a GPU: a study of one reserves 1 GPU per worker unless --gpus-per-worker says otherwise.
GPU_PROFILES = ("cifar100", "imagenet100")


# --smoke-test: on top of any profile, the smallest run that still exercises every code path (CI).
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.subset": 720, "data.val_size": 400, "data.test_limit": 1000, "data.num_workers": 0, "encoder.width": 0.125,
    "optim.batch_size": 64, "optim.epochs": 2, "optim.warmup_epochs": 1, "predictor.residual_scale_warmup_epochs": 1,
    "eval.probe_epochs": 3, "eval.knn_train_limit": 400, "eval.spectrum_samples": 400,
}


def profile(name: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """The defaults with a profile's overrides, then the caller's."""
    return build_config(name, overrides=overrides)

def _merge(tree: dict[str, Any], update: Mapping[str, Any], path: str = "") -> None:
    """Deep-merge a (partial) YAML tree into a full config tree (`tree` is its node at `path`); unknown keys are
    errors."""
    if not isinstance(update, Mapping):
        fail(path or "<root>", update, "must be a mapping of config keys")
    for key, value in update.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in tree:
            raise unknown_key(path, str(key), sorted(tree))
        if isinstance(tree[key], dict):
            _merge(tree[key], value, sub)
        else:
            tree[key] = value


def build_config(profile_name: str | None = None, config_file: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then a profile, then a YAML file, then dotted overrides: later layers win."""
    tree = Config().to_dict()
    if profile_name is not None:
        if profile_name not in PROFILES:
            fail("profile", profile_name, f"must be one of {', '.join(PROFILES)}")
        for key, value in PROFILES[profile_name].items():
            set_dotted(tree, key, value)
    if config_file is not None:
        _merge(tree, _config_mapping(config_file))
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return Config.from_dict(tree)


def _config_mapping(path: str | Path) -> Mapping[str, Any]:
    """A config file's tree. An empty file (or comments only: YAML's null) is no overrides; any other document that
    is not a mapping (`false`, `[]`, a number, a string) is refused naming its type, never read as "nothing"."""
    document = read_yaml_file(path)
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        kind = {bool: "a boolean", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
            type(document), type(document).__name__)
        raise ConfigError(f"config file '{path}' holds {kind} ({document!r:.40}), not a mapping of config keys; "
                          "write it as sections, e.g. 'predictor:' then '  steps: 3'.")
    return document


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['predictor.steps=3', ...] -> {'predictor.steps': '3'}; values are parsed later as YAML scalars."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set '{item}' is invalid: write it as dotted.key=value, e.g. predictor.steps=3.")
        overrides[key.strip()] = value.strip()
    return overrides
