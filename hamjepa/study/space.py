"""A search space as data: dotted config keys to distributions, read from YAML, checked before any work.

A study's space is a YAML file (`studies/energy_budget.yaml`, or `--space FILE`) of one line per searched field,
each value one of four distributions, written the way `--search KEY=DIST` writes it:

    predictor.steps: int(1, 4)               # integers 1..4, both ends included; int(1, 7, 2) = 1, 3, 5, 7
    predictor.dt: loguniform(0.01, 0.2)      # log-uniform on [low, high], low > 0
    hamjepa_loss.logdet_floor: uniform(-3.0, -0.5)
    sigreg.num_directions: choice(16, 32, 64)   # any values the field accepts (numbers, strings, true/false)

The text form is one grammar for the file and the flag (as Hydra's Optuna sweeper writes `interval(...)`), so a
dimension reads the same wherever it is written. `--freeze KEY` drops a dimension, `--search KEY=DIST` adds or
replaces one. Every dimension is checked against the config tree before Ray starts: the key must be a field,
the range non-empty, a continuous or integer distribution needs a numeric field, and the config must accept both
ends (every choice), so a trial can never be proposed a value the config refuses. Each problem is one sentence.

No Ray import at module level: the command line checks a space before loading Ray. The Tune domains (`tune()`)
are made when the study runs; Optuna receives them through Ray's OptunaSearch (int(low, high, step) becomes
Optuna's IntDistribution(low, high, step), both ends included).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hamjepa.config import Config, ConfigError, StrictLoader, field_type, read_yaml_file, yaml_problem

KINDS = ("uniform", "loguniform", "int", "choice")
EXAMPLES = "uniform(LOW, HIGH), loguniform(LOW, HIGH), int(LOW, HIGH[, STEP]) or choice(A, B, ...)"
_CALL = re.compile(r"\s*([a-z]+)\s*\((.*)\)\s*", re.DOTALL)


class SpaceError(ConfigError):
    """A bad search space: one sentence naming where it was written, the key and what would be valid."""


@dataclass(frozen=True)
class Dimension:
    """One searched config field: `kind` one of KINDS; `low`/`high` (and `step`, int only) or `choices`."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: int = 1
    choices: tuple[Any, ...] = ()
    source: str = field(default="the search space", compare=False)  # where it was written, named in errors

    def text(self) -> str:
        """The dimension as written in a space file or `--search` (canonical, so two spellings compare equal)."""
        if self.kind == "choice":
            return f"choice({', '.join(_scalar_text(c) for c in self.choices)})"
        step = f", {self.step}" if self.kind == "int" and self.step != 1 else ""
        return f"{self.kind}({_scalar_text(self.low)}, {_scalar_text(self.high)}{step})"

    def ends(self) -> tuple[Any, ...]:
        """The values a config must accept for every proposal to be valid: both ends, or every choice."""
        if self.kind == "choice":
            return self.choices
        high = self.high if self.kind != "int" else self.low + (self.high - self.low) // self.step * self.step
        return (self.low, high)

    def tune(self):
        """The Ray Tune domain (Ray's OptunaSearch turns it into the matching Optuna distribution)."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.qrandint(self.low, self.high, self.step)  # both ends included
        return tune.choice(list(self.choices))


class SearchSpace(Mapping[str, Dimension]):
    """Dotted config keys to dimensions, in the order written (the order of Tune's table columns)."""

    def __init__(self, dimensions: Iterable[Dimension] = ()):
        self._dimensions = {d.key: d for d in dimensions}

    def __getitem__(self, key: str) -> Dimension:
        return self._dimensions[key]

    def __iter__(self):
        return iter(self._dimensions)

    def __len__(self) -> int:
        return len(self._dimensions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and list(self._dimensions.values()) == list(other._dimensions.values())

    def __repr__(self) -> str:
        return f"SearchSpace({self.text()})"

    # -- reading ------------------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Any, source: str = "the search space") -> SearchSpace:
        """A space from {dotted key: "dist(...)"}; `source` names it in errors (a file, a flag)."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise SpaceError(f"{source} must be a mapping of dotted config keys to distributions, e.g. "
                             f"'predictor.dt: loguniform(0.01, 0.2)'; got {type(mapping).__name__}.")
        return cls(parse_dimension(str(key), text, source) for key, text in mapping.items())

    @classmethod
    def from_file(cls, path: str | Path) -> SearchSpace:
        """A space from a YAML file, read as config files are (config.read_yaml_file: its kind checked before it is
        opened, strictly, so a key written twice is an error, and safely)."""
        try:
            data = read_yaml_file(path, "search space file", "pass the path of a YAML file of dotted config keys to "
                                  "distributions (studies/energy_budget.yaml is one)")
        except ConfigError as error:
            raise SpaceError(str(error)) from None
        return cls.from_mapping(data, f"search space file '{path}'")

    # -- changing -----------------------------------------------------------------------------------------

    def frozen(self, keys: Iterable[str]) -> SearchSpace:
        """Without the `keys` (--freeze): each must be searched, else one sentence listing what is."""
        keys = list(keys)
        for key in keys:
            if key not in self._dimensions:
                raise SpaceError(f"--freeze {key}: '{key}' is not searched; the searched keys are "
                                 f"{', '.join(self._dimensions) or 'none'}.")
        return SearchSpace(d for k, d in self._dimensions.items() if k not in keys)

    def searching(self, items: Iterable[str]) -> SearchSpace:
        """With each `KEY=DIST` of `items` (--search) added, or replacing the dimension of that key."""
        dimensions = dict(self._dimensions)
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise SpaceError(f"--search '{item}' is invalid: write KEY=DIST, e.g. --search "
                                 "'predictor.dt=loguniform(0.01, 0.2)'.")
            dimension = parse_dimension(key.strip(), text, f"--search {key.strip()}")
            dimensions[dimension.key] = dimension
        return SearchSpace(dimensions.values())

    # -- checking and using -------------------------------------------------------------------------------

    def check(self, base: Config) -> None:
        """Before any work: a non-empty space whose every proposal `base` accepts (one sentence otherwise, naming
        where the dimension was written: its file or its --search)."""
        if not self._dimensions:
            raise SpaceError("the search space searches nothing (every key frozen?); search at least one key, or run "
                             "fixed configurations with `hamjepa train`.")
        for dimension in self._dimensions.values():
            check_dimension(dimension, base)

    def refuse_overrides(self, overrides: Iterable[str]) -> None:
        """`--set` on a searched key would only move the first trial's point: refused, naming --freeze."""
        for key in overrides:
            if key in self._dimensions:
                raise SpaceError(f"--set {key}: '{key}' is searched ({self._dimensions[key].text()}), so --set would "
                                 f"only change the first trial; fix it with --freeze {key} --set {key}=VALUE, or "
                                 f"change its range with --search '{key}=DIST'.")

    def tune(self) -> dict[str, Any]:
        """The Tune param space: dotted key -> Tune domain."""
        return {key: d.tune() for key, d in self._dimensions.items()}

    def text(self) -> str:
        """One line, `key=dist; ...`: a study's `study.search_space` param (a resumed study must match it)."""
        return "; ".join(f"{key}={d.text()}" for key, d in self._dimensions.items())

    def to_yaml(self) -> str:
        return "".join(f"{key}: {d.text()}\n" for key, d in self._dimensions.items())


# -- one dimension ------------------------------------------------------------------------------------------

def parse_dimension(key: str, text: Any, source: str) -> Dimension:
    """`text` as a Dimension of `key`: one of `EXAMPLES`; one sentence naming `source` and `key` otherwise."""
    where = f"{source}: '{key}'"
    match = _CALL.fullmatch(text) if isinstance(text, str) else None
    if match is None or match.group(1) not in KINDS:
        raise SpaceError(f"{where} = {text!r} is not a distribution; write {EXAMPLES}.")
    kind = match.group(1)
    args = _arguments(match.group(2), where)
    if kind == "choice":
        if not args:
            raise SpaceError(f"{where} = {text!r} is an empty choice; list at least one value.")
        if len(set(map(repr, args))) != len(args):
            raise SpaceError(f"{where} = {text!r} lists a value twice; list each once.")
        return Dimension(key, kind, choices=tuple(args), source=source)
    return _range(key, kind, args, f"{where} = {text!r}", source)


def _range(key: str, kind: str, args: list[Any], where: str, source: str) -> Dimension:
    count = (2, 3) if kind == "int" else (2,)
    if len(args) not in count:
        usage = "int(LOW, HIGH[, STEP])" if kind == "int" else f"{kind}(LOW, HIGH)"
        raise SpaceError(f"{where} has {len(args)} argument(s); write {usage}.")
    args = [_number(a) for a in args]
    if not all(_is_number(a) for a in args):
        raise SpaceError(f"{where} needs numbers as its bounds.")
    if kind == "int":
        if not all(float(a).is_integer() for a in args):
            raise SpaceError(f"{where} needs whole numbers; use uniform(LOW, HIGH) for a continuous range.")
        low, high, step = (int(a) for a in (*args, 1)[:3])
        if step < 1:
            raise SpaceError(f"{where} has step {step}; the step must be >= 1.")
        if low > high:
            raise SpaceError(f"{where} is an empty range (LOW > HIGH); write the lower bound first.")
        return Dimension(key, kind, low, high, step, source=source)
    low, high = (float(a) for a in args)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SpaceError(f"{where} is an empty range (it needs finite LOW < HIGH).")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where} needs LOW > 0 (a log scale); use uniform for a range that reaches 0.")
    return Dimension(key, kind, low, high, source=source)


def check_dimension(dimension: Dimension, base: Config) -> None:
    """The key is a config field of a type the distribution can produce, and the config accepts every end."""
    where = f"{dimension.source}: '{dimension.key}'"
    try:
        kind = field_type(Config, dimension.key)
    except ConfigError as error:
        raise SpaceError(f"{where}: {error}") from None
    numeric = kind in (int, float)
    if dimension.kind in ("uniform", "loguniform") and kind is not float:
        hint = "; use int(LOW, HIGH) for an integer field" if kind is int else "; use choice(...) for it"
        raise SpaceError(f"{where} = {dimension.text()} draws real numbers, but the field is "
                         f"{kind.__name__}{hint}.")
    if dimension.kind == "int" and not numeric:
        raise SpaceError(f"{where} = {dimension.text()} draws integers, but the field is {kind.__name__}; use "
                         "choice(...) for it.")
    for value in dimension.ends():
        try:
            base.override({dimension.key: value})
        except ConfigError as error:
            raise SpaceError(f"{where} = {dimension.text()} reaches {value!r}, which the config refuses ({error}"
                             ")") from None


def _arguments(text: str, where: str) -> list[Any]:
    """The comma-separated arguments as YAML scalars (`0.01`, `3`, `true`, `name`)."""
    if not text.strip():
        return []
    try:
        values = yaml.load(f"[{text}]", Loader=StrictLoader)
    except yaml.YAMLError as error:
        raise SpaceError(f"{where}: its arguments are not YAML values ({yaml_problem(error)}).") from None
    if any(isinstance(v, (list, dict)) for v in values):
        raise SpaceError(f"{where}: its arguments must be plain values (numbers, words, true/false, null).")
    return values


def _number(value: Any) -> Any:
    """A bound as a number: YAML 1.1 reads `1e-3` (no dot) as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
