"""Each framework example runs as its docstring says (one epoch, one process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script", ["lightning_gaf.py", "hf_trainer_gaf.py", "accelerate_gaf.py",
                                    "tensorboard_gaf.py"])
def test_framework_example_runs(script, tmp_path):
    args = [sys.executable, str(EXAMPLES / script), "--epochs", "1"]
    if script == "tensorboard_gaf.py":
        args += ["--log-dir", str(tmp_path / "board")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = re.search(r"(\d+) steps", done.stdout)
    assert summary and int(summary.group(1)) == 2048 // 64  # 2048 samples, 2 x 32 a step
    if script == "tensorboard_gaf.py":
        assert (tmp_path / "board" / "epochs.csv").is_file()
