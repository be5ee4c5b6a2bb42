"""cluster/requirements.lock: the nodes install exactly it, hash-checked, so it must pin every distribution the
project needs, with hashes, inside pyproject.toml's ranges and in step with constraints.txt.

The local environment (the one these tests run in, which CI builds from pyproject.toml) is the reference: every
distribution it holds that the project requires, directly or through another, must be in the lock by name.
"""

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "cluster" / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+) \\$")
HASH = re.compile(r"^    --hash=sha256:[0-9a-f]{64}( \\)?$")


def _lock():
    """{name: (version, number of hashes)}; every line is a pin, a hash of the pin above, or a comment."""
    pins, current = {}, None
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pin, digest = PIN.match(line), HASH.match(line)
        assert pin or (digest and current), f"not a hashed pin: {line!r}"
        if pin:
            current = canonicalize_name(pin["name"])
            assert current not in pins, current
            pins[current] = [Version(pin["version"]), 0]
        else:
            pins[current][1] += 1
    return pins


def _requirements(path):
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def _installed(name):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _required_closure(roots):
    """{name: installed version} of the installed distributions `roots` need, transitively, with their extras and
    this platform's markers (the nodes' platform too: Linux x86_64, Python 3.11)."""
    found, queue = {}, list(roots)
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        distribution = _installed(name)
        if distribution is None:
            continue  # not on this machine (a head-only extra such as Flask-WTF): the lock's own closure covers it
        extras = set(requirement.extras)
        new = name not in found
        found[name] = Version(distribution.version)
        for text in (distribution.requires or []) if new or extras else []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in extras | {""}):
                queue.append(child)
    return found


def test_every_line_is_an_exact_pin_with_hashes():
    pins = _lock()
    assert len(pins) > 100  # the whole tree, not just the direct dependencies
    assert all(count >= 1 for _, count in pins.values())


def test_the_lock_pins_every_dependency_inside_pyprojects_ranges_and_agrees_with_the_constraints():
    pins = _lock()
    for dependency in (Requirement(d) for d in PYPROJECT["project"]["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pins, name
        assert dependency.specifier.contains(pins[name][0], prereleases=True), (dependency, pins[name][0])
    for constraint in _requirements(ROOT / "cluster" / "constraints.txt"):
        pinned = Version(next(iter(constraint.specifier)).version)
        assert pins[canonicalize_name(constraint.name)][0] == pinned, constraint  # regenerated after every edit
    wanted = {canonicalize_name(r.name) for r in _requirements(ROOT / "cluster" / "requirements.in")}
    assert {canonicalize_name(Requirement(d).name) for d in PYPROJECT["project"]["dependencies"]} <= wanted
    assert {"boto3", "flask-wtf", "pyarrow", "setuptools"} <= set(pins)  # the head's extras, the offline build


def test_the_lock_covers_every_installed_distribution_the_project_requires():
    roots = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    roots += _requirements(ROOT / "cluster" / "requirements.in")
    needed = _required_closure(roots)
    assert len(needed) > 100 and "torch" in needed and "grpcio" in needed  # the walk reached the whole tree
    missing = sorted(set(needed) - set(_lock()))
    assert not missing, f"regenerate cluster/requirements.lock (its header has the command): {missing}"


def test_the_lock_is_closed_under_its_own_dependencies_where_this_machine_can_tell():
    pins = _lock()
    for name, (version, _) in pins.items():
        distribution = _installed(name)
        if distribution is None or Version(distribution.version) != version:
            continue
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                assert canonicalize_name(child.name) in pins, (name, text)


def test_the_header_says_how_to_regenerate_it_for_the_nodes_platform():
    header = LOCK.read_text().splitlines()[:3]
    command = next(line for line in header if "uv pip compile" in line)
    for part in ("cluster/requirements.in", "-c cluster/constraints.txt", "--python-version 3.11",
                 "--python-platform x86_64-manylinux", "--generate-hashes", "-o cluster/requirements.lock"):
        assert part in command, part
