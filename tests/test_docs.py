"""Every fenced example in README.md, docs/*.md and examples/*/README.md runs as written.

Per document, in a fresh folder that links the repository's experiments/ and examples/ (so
paths read as in the repository root), in document order:
- ```python blocks run in one namespace (later blocks may use earlier names); a block that
  prints must print something; a block marked ```python sketch (an API outline with names
  the reader supplies) is compiled, not run;
- ```bash / ```sh / ```console blocks run each command (lines, `&&` chains, `$ ` prompts):
  `growth ...` through the CLI in-process (it must exit 0), `python SCRIPT` as a process;
  `pip install ./examples/<package>` installs that example plug-in as pip lays it out, other
  `pip install` lines (the package itself), `python -m pytest` (this suite) and `mutmut`
  (this suite per mutant; also as `nice -n N .venv/bin/python -m mutmut`) are skipped.
  In a console block, every other line is output that the previous command must print
  (`...` stands for lines left out);
- ```yaml blocks parse strictly (duplicate keys are errors); a block whose top-level keys are
  all config keys is checked against the config schema and its strategy's settings;
- ```toml blocks parse;
- blocks without a language are text (trees, diagrams).
Whatever the examples write must be ignored by the repository's .gitignore.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from runfiles import example_modules, example_packages, install_example

from growth.cli import main

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").glob("*/README.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<body>.*?)"
                   r"^(?P=indent)```", re.M | re.S)
SHELLS = ("bash", "sh", "shell", "console")
SLOW = ("growth run", "run_config(", "Campaign(", "growth search", "growth compress",
        "python bench/")


def blocks(doc: Path) -> list[tuple[str, str, int]]:
    """(language, dedented code, line) of every fenced block of a document."""
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        indent = m.group("indent")
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in m.group("body").splitlines(keepends=True))
        lang = m.group("lang").lower()
        if lang == "python" and "sketch" in m.group("info").split():
            lang = "python-sketch"
        out.append((lang, body, text[: m.start()].count("\n") + 1))
    return out


def _param(doc: Path):
    slow = any(s in code for _, code, _ in blocks(doc) for s in SLOW)
    return pytest.param(doc, id=str(doc.relative_to(ROOT)),
                        marks=[pytest.mark.slow] if slow else [])


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("experiments", "examples"):
        (work / name).symlink_to(ROOT / name)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(site))
    from growth import strategies
    from growth.ops import registry

    saved_strategies, saved_ops = dict(strategies.STRATEGIES), dict(registry._BUILTIN)
    before = set(sys.modules)
    yield work, site
    strategies.STRATEGIES.clear()
    strategies.STRATEGIES.update(saved_strategies)
    registry._BUILTIN.clear()
    registry._BUILTIN.update(saved_ops)
    for name in set(sys.modules) - before:
        if name.startswith(tuple(example_modules())):
            del sys.modules[name]


def commands(code: str, console: bool) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a shell block."""
    out: list[tuple[str, list[str]]] = []
    for line in code.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if console and not line.startswith("$ "):
            assert out, f"output before any command: {line!r}"
            out[-1][1].append(line.rstrip())
            continue
        line = line[2:] if console else line
        out += [(part.strip(), []) for part in line.split("&&")]
    return out


def run_command(cmd: str, site: Path, capsys: pytest.CaptureFixture[str]) -> str:
    args = shlex.split(cmd, comments=True)
    assert "|" not in args, f"examples avoid pipes, so they run the same everywhere: {cmd}"
    if args[:2] == ["pip", "install"]:
        targets = [a for a in args[2:] if not a.startswith("-")]
        for folder in example_packages():
            if any(Path(t.strip("\"'")).resolve() == folder for t in targets):
                install_example(site, folder)
        return ""  # the package itself is installed already
    command = [a for a in args if not re.fullmatch(r"[A-Z_]+=\S*", a)]  # after VAR=value
    if command[:2] == ["nice", "-n"]:
        command = command[3:]
    if command[1:3] == ["-m", "mutmut"] and Path(command[0]).name == "python":
        command = command[2:]  # a checkout's own interpreter running mutmut
    if args[:3] == ["python", "-m", "pytest"] or command[:1] == ["mutmut"]:
        return ""  # this very suite (mutmut runs it once per mutant)
    if args[0] == "growth":
        capsys.readouterr()
        code = main(args[1:])
        captured = capsys.readouterr()
        assert code == 0, f"`{cmd}` exited {code}: {captured.err}"
        return captured.out
    if args[0] == "python":
        proc = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"`{cmd}` failed: {proc.stderr[-2000:]}"
        return proc.stdout
    raise AssertionError(f"the docs' example runs a command the test does not know: {cmd}")


def check_yaml(code: str, where: str) -> None:
    from growth.config import Config, parse_yaml
    from growth.strategies import get_strategy

    data = parse_yaml(code, where)
    if isinstance(data, dict) and set(data) <= set(Config.model_fields):
        cfg = Config.model_validate(data)  # a reference block may list keys of every kind
        get_strategy(cfg.strategy.name).Params.model_validate(cfg.strategy.settings())


@pytest.mark.parametrize("doc", [_param(d) for d in DOCS])
def test_document_examples_run_as_written(doc: Path, workdir: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str],
                                          request: pytest.FixtureRequest) -> None:
    work, site = workdir
    if any("growth search" in code for lang, code, _ in blocks(doc) if lang in SHELLS):
        request.getfixturevalue("ray_session")  # one Ray for the session, not one per command
    scope: dict = {"__name__": "docs_example"}
    for lang, code, line in blocks(doc):
        where = f"{doc.relative_to(ROOT)}:{line}"
        if lang == "python":
            capsys.readouterr()
            exec(compile(code, where, "exec"), scope)
            if "print(" in code:
                assert capsys.readouterr().out.strip(), f"{where} prints nothing"
        elif lang == "python-sketch":
            compile(code, where, "exec")
        elif lang in SHELLS:
            for cmd, expected in commands(code, lang == "console"):
                out = run_command(cmd, site, capsys)
                lines = [o.rstrip() for o in out.splitlines()]
                for want in expected:
                    assert want == "..." or want in lines, f"{where}: `{cmd}` printed no " \
                        f"line {want!r}:\n{out}"
        elif lang == "yaml":
            check_yaml(code, where)
        elif lang == "toml":
            tomllib.loads(code)
        else:
            assert lang in ("", "text"), f"{where}: unknown block language {lang!r}"
    made = [p.name + ("/" if p.is_dir() else "") for p in work.iterdir() if not p.is_symlink()]
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", *made],
                             capture_output=True, text=True).stdout.split() if made else []
    assert sorted(ignored) == sorted(made), f"{doc.name} examples write files git would track"


def test_every_document_has_runnable_examples() -> None:
    langs = {lang for d in DOCS for lang, _, _ in blocks(d)}
    assert {"python", "bash", "console", "yaml", "toml"} <= langs
    assert any(lang == "python" for lang, _, _ in blocks(ROOT / "docs" / "operators.md"))


def test_readme_and_docs_show_the_same_operator_plugin() -> None:
    def plugin(doc: Path) -> str:
        return next(code for lang, code, _ in blocks(doc)
                    if lang == "python" and code.startswith("# my_package/ops.py"))

    assert plugin(ROOT / "README.md") == plugin(ROOT / "docs" / "operators.md")


def test_readme_operator_example_registers_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from growth.search_spaces.networks import add_head, mlp

    from growth.ops import get_operator, registry

    code = next(code for lang, code, _ in blocks(ROOT / "README.md")
                if lang == "python" and code.startswith("# my_package/ops.py"))
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), scope)
    monkeypatch.setattr(registry, "_BUILTIN", dict(registry._BUILTIN))  # undone after the test
    registry.register(scope["SCALE"])

    graph = add_head(mlp((4,), [3]), "t0", 2)
    result = get_operator("scale_layer")(graph, node="fc1", factor=3.0)
    assert (result.graph.node("fc1").tensors["weight"] == 3 * graph.node("fc1").tensors["weight"]
            ).all()
    assert result.record.params == {"node": "fc1", "factor": 3.0}


def test_readme_growth_example_does_what_its_comments_say(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """The first example: an imported ResNet-18 widened and deepened keeps its function, the
    printed summary and record describe the graphs, and the saved folder loads back."""
    import torch

    from growth.compile import compile_graph
    from growth.graph import NetGraph

    monkeypatch.chdir(tmp_path)
    readme = ROOT / "README.md"
    code = next(code for lang, code, _ in blocks(readme)
                if lang == "python" and "import_module(torchvision.models.resnet18" in code)
    torch.manual_seed(0)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, str(readme), "exec"), scope)
    out = capsys.readouterr().out
    graph, wide, deep = scope["graph"], scope["wide"], scope["deep"]
    assert f"total parameters: {graph.param_count():,} in {len(graph)} nodes" in out
    assert "ChangeRecord(op='net2deeper'" in out
    assert wide.graph.node("layer1_0_conv1").tensors["weight"].shape[0] == 96
    assert graph.node("layer1_0_conv1").tensors["weight"].shape[0] == 64  # input untouched
    assert deep.record.added_nodes and all(n in deep.graph for n in deep.record.added_nodes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = compile_graph(graph).eval()(x)
        after = scope["net"](x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # function preserved
    loaded = NetGraph.load(tmp_path / "resnet_grown")
    assert loaded.param_count() == deep.graph.param_count() > graph.param_count()
    with torch.no_grad():
        torch.testing.assert_close(compile_graph(loaded).eval()(x), after)
