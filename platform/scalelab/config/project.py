"""Which project a command works in: the folder that holds its ``data/``, ``outputs/`` and ``.scalelab/``.

A recipe belongs to the project that contains it: the nearest folder, from the recipe's own
upwards, that holds a ``pipelines/`` folder or a ``pyproject.toml``, ``.dvc`` or ``.git``. Every
relative path of a recipe (``data.data_dir``, ``data.source``, ``train.output_dir``,
``train.storage_path``, ``search.output_dir``) and the embedded state (``.scalelab/``: MLflow
store, stack file, pipeline state) is relative to that folder, wherever the command is run from.
A recipe outside any project is refused: scalelab never scatters a new ``data/`` and a new MLflow
store into whatever folder a command happens to be started in.

Paths are made absolute but symlinks are *not* resolved: a project may link ``pipelines/`` from
elsewhere (the test suite does), and its outputs still belong where the link is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from scalelab.errors import ConfigError

PROJECT_MARKERS = ("pyproject.toml", ".dvc", ".git")


def absolute(path: str | Path) -> Path:
    """``path`` made absolute against the current folder, symlinks kept (unlike ``resolve``)."""
    return Path(os.path.abspath(path))


def is_project(folder: Path) -> bool:
    return (folder / "pipelines").is_dir() or any((folder / m).exists() for m in PROJECT_MARKERS)


def find_project_root(start: str | Path) -> Path | None:
    """The nearest folder at or above ``start`` that is a project (see the module doc), or None."""
    start = absolute(start)
    for folder in (start, *start.parents):
        if is_project(folder):
            return folder
    return None


def project_of_recipe(recipe: str | Path) -> Path:
    """The project a recipe file belongs to; a clear error when it belongs to none."""
    path = absolute(recipe)
    if not path.is_file():  # load_recipe names the missing file and the recipes there are
        return find_project_root(Path.cwd()) or Path.cwd()
    root = find_project_root(path.parent)
    if root is None:
        raise ConfigError(
            f"recipe {recipe} is not inside a project: no folder from {path.parent} upwards holds "
            f"pipelines/, {', '.join(PROJECT_MARKERS)}. Put the recipe in a project's pipelines/ "
            "folder, or make its folder a project (`git init` there), so that data/, outputs/ and "
            ".scalelab/ have a home"
        )
    return root


@contextlib.contextmanager
def in_project(recipe: str | Path | None = None) -> Iterator[Path]:
    """Run the body in the recipe's project folder (or, without a recipe, the project around the
    current folder, else the current folder itself); the caller's folder is restored afterwards.

    Relative path arguments that are not part of the recipe (``--out``, a model folder) must be
    made :func:`absolute` before entering.
    """
    root = project_of_recipe(recipe) if recipe is not None else (find_project_root(Path.cwd()) or Path.cwd())
    before = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(before)


def shown(path: str | Path) -> str:
    """``path`` as a user reads it in a message: relative to the current folder when inside it."""
    path = absolute(path)
    try:
        return str(path.relative_to(absolute(Path.cwd())))
    except ValueError:
        return str(path)
