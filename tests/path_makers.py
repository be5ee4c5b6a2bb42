"""Things to put at a path that a command is given, for the catalogues of bad inputs (test_bad_inputs.py,
test_script_inputs.py): each maker takes the path and returns the path to pass."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def text_file(text: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
        return path
    return make


def folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def named_pipe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def under_a_file(path: Path) -> Path:
    """A path whose folder is a regular file: nothing can be created there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"a file, not a folder")
    return path / "inside"
