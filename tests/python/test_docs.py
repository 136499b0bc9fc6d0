"""The code blocks of docs/usage.md run as written, in order."""

from __future__ import annotations

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
