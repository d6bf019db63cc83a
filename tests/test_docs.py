"""The README's Python examples run as written (docs stay true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), scope)  # raises if the example is broken
    if "print(" in code:
        assert capsys.readouterr().out.strip()
    if ".save(" in code:  # an example that saves writes real files
        assert any(tmp_path.rglob("weights.safetensors"))


def test_readme_operator_example_registers_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from growth.ops import get_operator, registry
    from search_spaces.networks import add_head, mlp

    scope: dict = {"__name__": "readme_example"}
    exec(compile(BLOCKS[1], str(README), "exec"), scope)
    monkeypatch.setattr(registry, "_BUILTIN", dict(registry._BUILTIN))  # undone after the test
    registry.register(scope["SCALE"])

    graph = add_head(mlp((4,), [3]), "t0", 2)
    result = get_operator("scale_layer")(graph, node="fc1", factor=3.0)
    assert (result.graph.node("fc1").tensors["weight"] == 3 * graph.node("fc1").tensors["weight"]
            ).all()
    assert result.record.params == {"node": "fc1", "factor": 3.0}
