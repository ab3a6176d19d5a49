"""tools/bytecode.py: setup byte-compiles the directories scalelab imports from, and the list is current."""

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIST = ROOT / "tools" / "bytecode-dirs.txt"


def _load():
    spec = importlib.util.spec_from_file_location("bytecode_tool", ROOT / "tools" / "bytecode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its worker processes find _compile by this name
    spec.loader.exec_module(module)
    return module


def test_compile_listed_compiles_listed_directories_only_and_skips_bad_files(tmp_path):
    site = tmp_path / "site"
    (site / "pkg" / "sub").mkdir(parents=True)
    (site / "other").mkdir()
    (site / "pkg" / "good.py").write_text("X = 1\n")
    (site / "pkg" / "broken.py").write_text("def f(:\n")  # does not compile: skipped, not fatal
    (site / "pkg" / "sub" / "deep.py").write_text("Y = 2\n")  # a subdirectory: not listed, not compiled
    (site / "other" / "skip.py").write_text("Z = 3\n")
    listing = tmp_path / "dirs.txt"
    listing.write_text("pkg\nnot/installed/here\n")  # a missing directory is not an error

    done = _load().compile_listed(listing, site=str(site))

    assert done == 1
    cached = [p.name for p in (site / "pkg" / "__pycache__").iterdir()]
    assert len(cached) == 1 and cached[0].startswith("good.")
    assert not (site / "pkg" / "sub" / "__pycache__").exists()
    assert not (site / "other" / "__pycache__").exists()


def test_the_committed_list_covers_what_the_cli_and_a_ray_train_worker_import():
    """A stale list (after a lock bump without `make bytecode-list`) fails here, not silently slow."""
    site = sysconfig.get_paths()["purelib"]
    probe = (
        "import os, sys, sysconfig\n"
        "import scalelab.cli, scalelab.train.ray_trainer, scalelab.serve.app, ray.train.torch, ray.tune\n"
        "site = sysconfig.get_paths()['purelib']\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    if f.startswith(site + os.sep):\n"
        "        print(os.path.relpath(os.path.dirname(f), site))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = set(out.stdout.split())
    listed = set(LIST.read_text().split())
    assert imported, "the probe imported nothing from site-packages: " + site
    missing = sorted(imported - listed)
    assert not missing, (
        f"run `make bytecode-list` and commit tools/bytecode-dirs.txt; not listed: {missing[:10]}"
    )
