"""Reproducible installs: the lock pins every package with hashes, agrees with pyproject.toml's
ranges, and is what this environment (made by `make`) actually runs."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def _lock_entries() -> dict[str, tuple[str, Marker | None, list[str]]]:
    """name → (version, marker, hashes) from requirements.lock (pip's hash-checking format)."""
    text = LOCK.read_text()
    entries: dict[str, tuple[str, Marker | None, list[str]]] = {}
    # one entry: "name==version [; marker] \" then "--hash=sha256:..." lines
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.split("\\", 1)[0].strip()
        if not first or first.startswith("#"):
            continue
        req = Requirement(first)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{first}: the lock pins exact versions"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        entries[canonicalize_name(req.name)] = (spec.version, req.marker, hashes)
    return entries


def _project_requirements() -> list[Requirement]:
    """The dependencies and the extras the lock is made with (`make lock`); an extra that names the
    project's own (``notifyctl[sandbox]`` in ``test``) is not a package: its extra is listed here too."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("sandbox", "test", "bench"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    own = canonicalize_name(project["name"])
    assert all(r.extras <= {"sandbox", "test", "bench"} for r in reqs if canonicalize_name(r.name) == own)
    return [r for r in reqs if canonicalize_name(r.name) != own]


def test_lock_pins_every_package_with_hashes() -> None:
    entries = _lock_entries()
    assert len(entries) > 50
    for name, (version, _marker, hashes) in entries.items():
        assert hashes, f"{name}=={version} has no hash"


def test_lock_agrees_with_pyproject_ranges() -> None:
    entries = _lock_entries()
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        assert name in entries, f"{req} is in pyproject.toml but not in the lock: run `make lock`"
        version = entries[name][0]
        assert req.specifier.contains(version, prereleases=True), f"lock has {name}=={version}, outside {req}"
        # every direct dependency is bounded above: a new major release cannot arrive unannounced;
        # but not the date-versioned data (time zones, CA roots), whose bound would only hold back data
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier) or name in ("pytz", "certifi"), (
            f"{req}: give it an upper bound"
        )


@pytest.mark.skipif(
    bool(os.environ.get("NOTIFY_TEST_UNLOCKED")), reason="make test-latest: newest releases, not the lock"
)
def test_environment_is_the_locked_set() -> None:
    """What `make` installed is exactly the lock (on this platform), nothing newer."""
    mismatched = []
    for name, (version, marker, _hashes) in _lock_entries().items():
        if marker is not None and not marker.evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            mismatched.append(f"{name}: not installed (lock {version})")
            continue
        if installed != version:
            mismatched.append(f"{name}: {installed} installed, lock {version}")
    assert not mismatched, (
        "the environment is not the locked set (run `make install` after `make lock`):\n" + "\n".join(mismatched)
    )
