"""The installable package: one top-level name, `zinfer`, and a wheel that runs once installed."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"shared": "zinfer.shared", "services": "zinfer.services", "cli": "zinfer.cli", "zinfer": "zinfer"}


def _sources() -> list[Path]:
    found = []
    for top in (*FOLDERS, "tests", "bench", "examples"):
        found += sorted((REPO / top).rglob("*.py"))
    return found + [REPO / "scripts" / "wheel-check"]


def test_pyproject_maps_every_package_folder_under_zinfer():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = tool["package-dir"]
    assert {k: v for k, v in mapped.items() if k != "zinfer.configs"} == {v: k for k, v in FOLDERS.items()}
    assert mapped["zinfer.configs"] == "configs"
    folders = set()
    for folder, package in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            folders.add(".".join((package, *parts)))
    assert folders | {"zinfer.configs"} == set(tool["packages"]), "pyproject's packages list and the folders differ"
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["zinfer"] == \
        "zinfer.cli.main:main"


def test_nothing_imports_the_folders_by_their_repository_names():
    """In the checkout `import shared` would still work (the folder is on sys.path) and give a second copy of
    every module, with its own exception classes; installed it fails. Only zinfer.* names are allowed."""
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # module names in strings: loaders ("pkg.mod:fn"), preload lists, `python -m X`
                if node.value.split(".")[0].split(":")[0] in ("shared", "services", "cli") and "." in node.value \
                        and " " not in node.value and "/" not in node.value:
                    names = [node.value]
            bad += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                    if n.split(".")[0] in ("shared", "services", "cli")]
    assert not bad, "\n".join(bad)


def test_the_wheel_installs_and_runs_outside_the_checkout(tiny_models, tmp_path):
    """scripts/wheel-check: build, check the wheel's names and configs, install into a fresh venv, then from an
    empty folder elsewhere: --version, up, register, launch, one generate, down."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "wheel-check"), "--work", str(tmp_path),
                          "--models", str(tiny_models["pytorch"].parent)], capture_output=True, text=True,
                         timeout=280)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "top level ['zinfer', 'zinfer-0.1.0.dist-info']" in out.stdout
    assert "wheel-check: ok" in out.stdout
