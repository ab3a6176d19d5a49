"""requirements.lock against pyproject.toml, offline: every direct requirement is pinned there, by a
version its specifier admits, with hashes; torch is the CPU build. `make lock-check` (CI) goes
further: it re-resolves with uv and fails on any difference, transitive pins included."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def locked() -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, sha256 hashes) for each pin of requirements.lock."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    name = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := PIN.match(line):
            name = canonicalize_name(match[1])
            pins[name] = (Version(match[2]), [])
        elif name and (hashed := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[name][1].append(hashed[1])
    return pins


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_direct_requirement_is_pinned_within_its_specifier() -> None:
    pins = locked()
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {req.name}=={version}, outside pyproject.toml's {req}: run `make lock`"
        )


def test_every_pin_has_hashes() -> None:
    pins = locked()
    assert len(pins) > 100  # the whole transitive set, not only the direct requirements
    assert not [name for name, (_, hashes) in pins.items() if not hashes]


def test_torch_is_the_cpu_build() -> None:
    version, hashes = locked()["torch"]
    assert str(version) == "2.13.0+cpu"  # PyPI's 2.13.0 is a CUDA build (other files, other hashes)
    assert len(hashes) == 1


def test_uv_is_locked_for_the_bootstrap() -> None:
    assert "uv" in locked()  # tools/deps.sh installs uv with pip from this pin, then the rest with uv
