"""`platform/` holds the package but must never shadow the standard library's `platform`."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_platform_is_stdlib_under_pytest():
    import platform

    assert platform.system()  # a real call into the stdlib module
    assert not (REPO / "platform" / "__init__.py").exists()


def test_platform_is_stdlib_from_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, scalelab; print(platform.system(), scalelab.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    system, path = out.stdout.split()
    assert system == __import__("platform").system()
    assert path.endswith("platform/scalelab/__init__.py")


def test_top_level_layout():
    for name in ("platform", "pipelines", "jobs", "tests", "pyproject.toml", "dvc.yaml"):
        assert (REPO / name).exists(), name
    assert (REPO / "platform" / "scalelab" / "__init__.py").exists()
