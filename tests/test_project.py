"""The project's own consistency: environment.yml mirrors pyproject, notebook pairs agree."""

import tomllib
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | {d for extra in project["optional-dependencies"].values() for d in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip_section) == declared
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert project["requires-python"] == ">=" + python.split("=")[1]


def notebook_pairs():
    scripts = {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")}
    notebooks = {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    assert scripts == notebooks, f"unpaired notebooks: {sorted(scripts ^ notebooks)}"
    return sorted(scripts)


def test_there_are_notebooks():
    assert len(notebook_pairs()) >= 3


def cells(notebook):
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("name", notebook_pairs())
def test_notebook_pair_in_sync(name):
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    stored = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    assert cells(script) == cells(stored), (
        f"{name}.py and {name}.ipynb differ: run `.venv/bin/jupytext --sync notebooks/{name}.py`"
    )
    assert all(not cell.get("outputs") for cell in stored.cells), f"{name}.ipynb is committed with outputs"


def test_no_deps_installs_are_documented_for_conda_users():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    no_deps = [line.split("--no-deps")[1].split()[0] for line in setup.splitlines() if "pip_install --no-deps" in line]
    assert no_deps, "setup.sh installs nothing with --no-deps any more: update this test"
    env = (ROOT / "environment.yml").read_text()
    for requirement in no_deps:
        assert f"pip install --no-deps {requirement}" in env
