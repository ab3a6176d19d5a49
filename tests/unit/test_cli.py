"""The verb table of `scalelab`: lazy imports, the help it lists, SCALELAB_DEBUG, and the project a
command writes into (the recipe's, never the folder it happens to be run from)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scalelab import cli
from scalelab.config.project import find_project_root, in_project, project_of_recipe
from scalelab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "platform")}


def leaves(table: dict, prefix: str = ""):
    for name, entry in table.items():
        if isinstance(entry, cli.Group):
            yield from leaves(entry.verbs, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", entry


@pytest.mark.parametrize("verb,entry", list(leaves(cli.VERBS)))
def test_every_verb_is_a_module_function_whose_docstring_is_the_listed_help(verb, entry):
    fn = cli.load_verb(entry.target)
    assert inspect.isfunction(fn), verb
    assert " ".join(inspect.getdoc(fn).split("\n\n")[0].split()) == entry.help, verb
    command = cli.as_command(fn)  # typer can read every parameter the CLI shows
    assert all(p.kind is not p.KEYWORD_ONLY for p in inspect.signature(command).parameters.values())


ENGINES = ("torch", "ray", "mlflow", "dvc")  # none is needed to list verbs or variants


def run_cli_listing_modules(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``scalelab ARGS`` in a fresh interpreter; its stdout ends with the engines it imported and
    whether it imported pydantic (typer needs it to read a verb's parameters, not to list verbs)."""
    code = (
        "import sys\n"
        "from scalelab.cli import main\n"
        f"sys.argv = ['scalelab', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', sorted(m for m in {ENGINES!r} if m in sys.modules))\n"
        "print('PYDANTIC', 'pydantic' in sys.modules)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_help_and_the_verb_listing_import_no_engine():
    out = run_cli_listing_modules(["--help"], ENV)
    assert "HEAVY []" in out.stdout and "PYDANTIC False" in out.stdout, out.stdout + out.stderr
    for verb in ("train", "pipeline", "evaluate", "serve"):  # listed without importing their modules
        assert verb in out.stdout


def test_models_variants_from_the_cache_imports_no_engine(tmp_path: Path):
    from scalelab.config.variants import list_models
    from scalelab.models.summary import cache_key

    # the cache `scalelab models variants` reads (written by the first listing, which needs torch)
    cache = tmp_path / "scalelab" / f"variants-{cache_key(1, 28, 10)}.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({name: {"params": 4321, "flops": 9_000_000} for name in list_models()}))
    out = run_cli_listing_modules(["models", "variants"], {**ENV, "XDG_CACHE_HOME": str(tmp_path)})
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert "msresnet_tiny" in out.stdout and "4,321" in out.stdout  # the rows, from that cache


def test_unknown_verb_is_a_usage_error():
    result = CliRunner().invoke(cli.app, ["trian"])
    assert result.exit_code == 2 and "Did you mean 'train'" in result.output


def test_scalelab_debug_shows_the_traceback_of_a_scalelab_error(tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\ntrain: {epochs: -1}\n")
    (tmp_path / ".git").mkdir()  # a project, so the recipe itself is what is wrong
    cmd = [sys.executable, "-m", "scalelab.cli", "data", "verify", str(recipe)]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)
    assert plain.returncode == 2 and "error:" in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run(
        cmd, capture_output=True, text=True, env={**ENV, "SCALELAB_DEBUG": "1"}, timeout=60
    )
    assert debug.returncode == 2 and "error:" in debug.stderr
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr and "loader.py" in debug.stderr


def test_project_root_keeps_symlinks_and_walks_up(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "pipelines").mkdir(parents=True)
    project = tmp_path / "project"
    project.mkdir()
    (project / "pipelines").symlink_to(elsewhere / "pipelines")
    (elsewhere / "pipelines" / "r.yaml").write_text("name: r\n")
    assert project_of_recipe(project / "pipelines" / "r.yaml") == project  # not `elsewhere`
    (project / ".scalelab" / "tune" / "s").mkdir(parents=True)
    assert find_project_root(project / ".scalelab" / "tune" / "s") == project


def test_recipe_outside_any_project_is_refused(tmp_path: Path, monkeypatch):
    import scalelab.config.project as project

    monkeypatch.setattr(project, "find_project_root", lambda start: None)  # / may hold a .git
    recipe = tmp_path / "loose.yaml"
    recipe.write_text("name: loose\n")
    with pytest.raises(ConfigError, match="not inside a project"), in_project(recipe):
        pass


def test_a_verb_run_from_an_unrelated_folder_writes_under_the_recipe_project(workdir: Path, tmp_path: Path):
    from scalelab.data.commands import prepare

    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    os.chdir(unrelated)  # the workdir fixture restores the folder afterwards
    path = prepare(workdir / "pipelines" / "digits.yaml")
    assert path == workdir / "data" / "digits" and (path / "metadata.json").is_file()
    assert list(unrelated.iterdir()) == []  # no data/, outputs/ or .scalelab/ here
    assert Path.cwd() == unrelated  # the caller's folder is restored


def test_cli_from_an_unrelated_folder_trains_into_the_project(workdir: Path, tmp_path: Path):
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    recipe = workdir / "pipelines" / "digits.yaml"
    fast = ["model.variant=msresnet_tiny", "train.epochs=1", "train.threads=1", "train.run_name=far"]
    out = subprocess.run(
        [sys.executable, "-m", "scalelab.cli", "train", str(recipe), *fast],
        cwd=unrelated,
        capture_output=True,
        text=True,
        env={k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"},
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(unrelated.iterdir()) == []
    assert (workdir / "outputs" / "far" / "model" / "model.safetensors").is_file()
    assert (workdir / ".scalelab" / "mlflow.db").is_file()  # the project's embedded store
    assert "done" in out.stdout and str(workdir / "outputs" / "far" / "model") in out.stdout


def test_error_messages_with_brackets_print_as_text(tmp_path: Path):
    # an error quoting a path or a log line like "[/tmp/x/haproxy.cfg:7]" is not rich markup
    (tmp_path / ".git").mkdir()
    cmd = [sys.executable, "-m", "scalelab.cli", "data", "verify", "missing[/x].yaml"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr and "missing[/x].yaml" in proc.stderr
