"""The code blocks of docs/usage.md run as written, in order."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_usage_examples_run(tmp_path, monkeypatch, capsys):
    text = open(os.path.join(ROOT, "docs", "usage.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/usage.md block {i}", "exec"), env)
    out = capsys.readouterr().out
    assert "rotation differs" in out


def _defined_tests(path: str) -> set:
    """Names of the test functions a test file defines (Python: top-level
    ``def``; C: ``static void name(``)."""
    text = open(os.path.join(ROOT, path)).read()
    if path.endswith(".py"):
        return {n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
    return set(re.findall(r"^static void (\w+)\(", text, flags=re.M))


def test_errors_table_cites_tests_that_exist():
    """Every row of docs/errors.md names a test (or is marked open), and
    every test it names exists: the table cannot outlive its evidence."""
    text = open(os.path.join(ROOT, "docs", "errors.md")).read()
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| case ")]
    assert len(rows) >= 60
    cited = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        refs = re.findall(r"`(tests/[\w/]+\.(?:py|c))::(\w+)`", cells[-1])
        assert refs or "**open**" in row, f"docs/errors.md row without a test: {row[:80]}"
        cited += refs
    missing = [f"{path}::{name}" for path, name in cited
               if not os.path.exists(os.path.join(ROOT, path))
               or name not in _defined_tests(path)]
    assert missing == []
