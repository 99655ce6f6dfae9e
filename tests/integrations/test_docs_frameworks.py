"""The integrations page's framework snippets run as written (each in a fresh directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
NAMES = ["lightning", "transformers", "accelerate", "tensorboard"]


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)


def test_readme_has_one_snippet_per_framework():
    blocks = snippets()
    assert len(blocks) == len(NAMES)
    for name, block in zip(NAMES, blocks, strict=True):
        assert f"gaf.integrations.{name}" in block


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_readme_framework_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    source = f"docs/integrations.md {NAMES[index]} snippet"
    exec(compile(snippets()[index], source, "exec"), namespace)
    windows = 256 // 16 // 4  # every snippet: 256 samples, micro-batches of 16, M = 4
    if NAMES[index] == "lightning":
        assert namespace["gaf_callback"].stats.steps == windows
    elif NAMES[index] == "transformers":
        assert namespace["trainer"].gaf_stats.steps == windows
        assert any("gaf/skipped" in row for row in namespace["trainer"].state.log_history)
    elif NAMES[index] == "accelerate":
        assert namespace["gaf_step"].stats.steps == windows
    else:
        lines = (tmp_path / "runs/tensorboard/steps.csv").read_text().splitlines()
        assert len(lines) == 1 + 16
        assert namespace["trainer"].stats.steps == 16
