"""A resumed study's own files, parsed with one sentence for each way they can be damaged: `latest.json` (which
invocation is newest) and `<study id>/study.json` (what that invocation was started with).

Both are written by this tool (study/invocation.py), but they live in a folder users copy, edit, sync and fill
disks in; a truncated write, a hand edit or a file from another tool must stop `--resume` with a sentence that
names the file and what to do, never a JSONDecodeError or KeyError traceback, and never a study id that walks out
of the study's folder (`../other`).
"""

from __future__ import annotations

import json
from typing import Any

from hamjepa import checks
from hamjepa.errors import UserError
from hamjepa.redact import mask_uri

FIX = "restore it from a backup, or start a new study without --resume"


def _json_object(text: str, path: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:  # JSONDecodeError is a ValueError; so is a decoding problem
        empty = "is empty" if not text.strip() else f"is not valid JSON ({error.msg} at offset {error.pos})" \
            if isinstance(error, json.JSONDecodeError) else "is not valid JSON"
        raise UserError(f"--resume cannot read '{mask_uri(path)}': it {empty}, likely cut short by a full disk or an "
                        f"interrupted copy; {FIX}.") from None
    if not isinstance(value, dict):
        raise UserError(f"--resume cannot read '{mask_uri(path)}': it holds a JSON {type(value).__name__}, not the "
                        f"object this tool writes; {FIX}.")
    return value


def _study_id(value: Any, path: str) -> str:
    if not isinstance(value, str) or not checks.SAFE_NAME.fullmatch(value) or value in (".", ".."):
        raise UserError(f"--resume cannot read '{mask_uri(path)}': its \"id\" is {value!r:.60}, not a study id "
                        f"(letters, digits, '.', '_', '-'); {FIX}.")
    return value


def parse_pointer(text: str, path: str) -> str:
    """latest.json's study id."""
    document = _json_object(text, path)
    if "id" not in document:
        raise UserError(f"--resume cannot read '{mask_uri(path)}': it has no \"id\"; pass --resume <study id> of the "
                        "study to continue (the folders beside it are named after them).")
    return _study_id(document["id"], path)


def parse_identity(text: str, path: str, study_id: str) -> dict[str, Any]:
    """study.json: {"id": study_id, "params": {name: value as a string}, ...}, checked field by field."""
    document = _json_object(text, path)
    for field in ("id", "params"):
        if field not in document:
            raise UserError(f"--resume cannot read '{mask_uri(path)}': it has no \"{field}\"; {FIX}.")
    if _study_id(document["id"], path) != study_id:
        raise UserError(f"--resume cannot read '{mask_uri(path)}': it describes study '{document['id']}', not "
                        f"'{study_id}' whose folder holds it; {FIX}.")
    params = document["params"]
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise UserError(f"--resume cannot read '{mask_uri(path)}': its \"params\" is not a mapping of names to "
                        f"strings; {FIX}.")
    return document
