"""The README's quick-start snippet runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_snippet_runs():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S)
    assert match, "README has no Quick start python block"
    namespace: dict = {}
    exec(compile(match.group(1), "README quick start", "exec"), namespace)
    # The snippet's three entry points all produced results.
    assert namespace["out"].result.num_micro_batches == 2
    assert namespace["result"].num_micro_batches == 4
    assert namespace["r"].grad.shape == (1000,)
