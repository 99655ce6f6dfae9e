"""examples/train_distributed.py refuses a rule that cannot run on M rows before training.

The documented fault command (``--rule multi-krum --micro-batches 2 --fault scale
--faulty-ranks 1``) needs M = ranks × 2 > 2f + 2 with f = 2 faulty rows: on 2 ranks it must
stop at once with the reason, not with a traceback at the first step. The check reads
WORLD_SIZE (what torchrun sets) before any process group starts, so one process shows it.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
COMMAND = ["--rule", "multi-krum", "--micro-batches", "2", "--fault", "scale",
           "--faulty-ranks", "1"]


def run_as_rank0_of(world: int, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0",
               LOCAL_WORLD_SIZE=str(world))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, capture_output=True,
                          text=True, timeout=120)
    return done, time.monotonic() - start


def test_multi_krum_on_two_ranks_is_refused_before_training():
    done, elapsed = run_as_rank0_of(2, *COMMAND)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "multi-krum with f = 2 needs more than 2f + 2 = 6 micro-gradients, got M = 4" in out
    assert "2 ranks × 2 micro-batches" in out
    assert "Traceback" not in out, out
    assert elapsed < 60, elapsed


def test_bad_rule_options_are_refused_without_a_traceback():
    done, _ = run_as_rank0_of(4, "--rule", "multi-krum", "--rule-options", '{"g": 1}')
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "takes no option 'g'" in out and "Traceback" not in out
