"""Run every Python code block of docs/manifolds.md, so the guide stays correct."""

import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "manifolds.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_guide_has_code_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_guide_code_block_runs(index):
    exec(compile(BLOCKS[index], f"{GUIDE.name} block {index}", "exec"), {"__name__": "docs_example"})
