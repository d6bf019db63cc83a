"""Installing growth adds one name to `sys.path`: `growth`. The repository keeps
`controllers/` and `search_spaces/` at its top level; setuptools' package-dir mapping installs
them as `growth.controllers` and `growth.search_spaces` (docs/architecture.md, "Floors")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"growth": ROOT / "growth", "growth/controllers": ROOT / "controllers",
           "growth/search_spaces": ROOT / "search_spaces"}


def _built(tmp_path: Path) -> Path:
    """The tree setuptools installs (build_py: what a wheel or `pip install` copies)."""
    out = tmp_path / "built"
    proc = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                           "build_py", "-d", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_the_installed_top_level_names_are_only_growth(tmp_path: Path) -> None:
    built = _built(tmp_path)
    assert sorted(p.name for p in built.iterdir()) == ["growth"]
    # every package folder of the sources is installed, under growth/, module for module
    for target, folder in SOURCES.items():
        for init in folder.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            package = init.parent.relative_to(folder)
            modules = sorted(p.name for p in init.parent.glob("*.py"))
            installed = built / target / package
            assert sorted(p.name for p in installed.glob("*.py")) == modules, \
                f"{init.parent} is not installed whole as {target}/{package}: add it to " \
                "[tool.setuptools] packages in pyproject.toml"


def test_the_docs_and_examples_import_only_growth() -> None:
    """README, docs and examples write `growth.controllers`, never a top-level name."""
    import re

    texts = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("examples/**/*.py"),
             *ROOT.glob("examples/**/*.md"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("experiments/**/*.yaml")]
    bare = re.compile(r"(?<![\w./])(from|import)\s+(controllers|search_spaces)\b")
    wrong = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts
             for m in bare.finditer(p.read_text(encoding="utf-8"))]
    assert not wrong, "\n".join(wrong)
