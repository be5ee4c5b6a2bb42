"""HamJEPA Studies: Ray Tune + Optuna searches of HamJEPA against SIGReg, logged to MLflow.

The stable seams, importable from here (docs/design.md "Stable seams"):

    from hamjepa import Study, SearchSpace, Config, profile, build_config, load_encoder

They load on first use, so `import hamjepa` (and the command line's input checks) stay free of torch, Ray and MLflow.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hamjepa")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# name -> the module that defines it
_EXPORTS = {
    "Study": "hamjepa.study.api",
    "StudyResult": "hamjepa.study.invocation",
    "SearchSpace": "hamjepa.study.space",
    "Config": "hamjepa.config",
    "profile": "hamjepa.config",
    "build_config": "hamjepa.config",
    "load_encoder": "hamjepa.train.encoder_artifact",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hamjepa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later look-ups skip this function
    return value
