"""Byte-compile the part of the venv that scalelab imports, in parallel (used by tools/deps.sh).

uv installs packages without their .pyc files. Where PYTHONDONTWRITEBYTECODE is set (as on this
machine) Python then compiles every imported module from source at every start, so `make setup`
compiles ahead. Compiling all of site-packages costs ~57 s here; most of it is never imported
(sympy's, moto's, databricks' unused corners, package test suites). This compiles only the
directories listed in tools/bytecode-dirs.txt (site-packages-relative; each directory's own .py
files, not its subdirectories): the directories holding a module that a scalelab process imports.

  python tools/bytecode.py compile [LIST]   compile the listed directories (~2x faster than all)
  python tools/bytecode.py list [LIST]      regenerate the list: imports every scalelab module and
                                            the entry points Ray/MLflow/DVC/moto start, records
                                            where their modules live (`make bytecode-list`)

Anything outside the list still works: it is compiled when first imported (and cached there
when PYTHONDONTWRITEBYTECODE is unset, as the Makefile's targets do).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import py_compile
import sys
import sysconfig
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_LIST = Path(__file__).with_name("bytecode-dirs.txt")

# Modules that processes other than the scalelab CLI import: Ray's own daemons (dashboard,
# its agents, log monitor, autoscaler monitor), Ray Serve's controller/proxy, MLflow's tracking
# server, moto's S3 server (tests), DVC's CLI (pipeline stages).
ENTRY_POINTS = [
    "ray.train.torch",
    "ray.tune",
    "ray.serve",
    "ray.serve._private.controller",
    "ray.serve._private.proxy",
    "ray.data",
    "ray.dashboard.dashboard",
    "ray.dashboard.agent",
    "ray._private.runtime_env.agent.main",
    "ray._private.log_monitor",
    "ray.autoscaler._private.monitor",
    "mlflow.server",
    "dvc.cli",
    "dvc_s3",
    "moto.server",
    "torch._dynamo",
    "uvicorn",
    "boto3",
]
# Packages whose submodules are loaded by name at run time (dashboard modules, Serve internals).
WALK = ["scalelab", "ray.dashboard.modules"]


def _site() -> str:
    return sysconfig.get_paths()["purelib"]


def _compile(path: str) -> bool:
    try:
        py_compile.compile(path, doraise=True)
        return True
    except (py_compile.PyCompileError, SyntaxError, UnicodeDecodeError, OSError):
        return False  # a template or old syntax: skipped, as pip and compileall skip it


def compile_listed(list_file: Path, site: str | None = None) -> int:
    site = site or _site()
    files: list[str] = []
    for rel in list_file.read_text().split():
        directory = os.path.join(site, rel)
        if not os.path.isdir(directory):
            continue  # another version of a package: it compiles on first import instead
        files += [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".py")]
    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_compile, files, chunksize=64))
    print(f"byte-compiled {done} of {len(files)} modules in {len(list_file.read_text().split())} directories")
    return done


def write_list(list_file: Path) -> int:
    failed = []
    for name in ENTRY_POINTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional entry point: noted, not fatal
            failed.append(f"{name}: {exc!r}"[:160])
    for root in WALK:
        try:
            package = importlib.import_module(root)
        except Exception as exc:  # noqa: BLE001
            failed.append(f"{root}: {exc!r}"[:160])
            continue
        for info in pkgutil.walk_packages(package.__path__, root + "."):
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # noqa: BLE001
                failed.append(f"{info.name}: {exc!r}"[:160])
    site = _site()
    dirs = sorted(
        {
            os.path.relpath(os.path.dirname(module.__file__), site)
            for module in list(sys.modules.values())
            if (getattr(module, "__file__", None) or "").startswith(site + os.sep)
        }
    )
    list_file.write_text("\n".join(dirs) + "\n")
    for line in failed:
        print(f"note: not imported: {line}", file=sys.stderr)
    print(f"wrote {list_file} ({len(dirs)} directories); commit it with requirements.lock")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("compile", "list"):
        print(__doc__, file=sys.stderr)
        return 2
    list_file = Path(argv[1]) if len(argv) > 1 else DEFAULT_LIST
    if argv[0] == "list":
        return write_list(list_file)
    compile_listed(list_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
