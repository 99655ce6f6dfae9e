"""The cases of issue 19 ("nothing wrong in silence") run as a user runs them: real `gaf`
subprocesses (and one library call in a fresh interpreter). Each must do the right thing or
stop at once with a message naming the problem, never with a traceback.

The commands are independent, so they run side by side (two at a time at most beyond the
first phase's grid) to keep the file fast on a shared machine; each test then checks its
own command's outcome. Needs Fashion-MNIST at /usr/share/datasets/fashion-mnist (``make
test`` installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist")
GAF = [sys.executable, "-m", "gaflab.cli"]
TINY = ["--train-size", "200", "--test-size", "100", "--epochs", "1", "--max-steps", "2",
        "--no-plots", "--quiet"]
FAST_FAIL_S = 30  # "within seconds": interpreter and torch start-up on a loaded machine

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(),
                                reason="Fashion-MNIST not installed (make test installs it)")


@dataclass
class Outcome:
    returncode: int
    out: str
    seconds: float


def run(args: list[str], cwd: Path) -> Outcome:
    env = dict(os.environ, GAF_DATA_DIR="")  # only the system copy, unless --data-dir
    start = time.monotonic()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return Outcome(done.returncode, done.stdout + done.stderr, time.monotonic() - start)


def refused(o: Outcome, *fragments: str) -> None:
    """Failed fast, with a message holding every fragment and no traceback."""
    assert o.returncode != 0, o.out
    assert "Traceback" not in o.out, o.out
    for fragment in fragments:
        assert fragment in o.out, o.out
    assert o.seconds < FAST_FAIL_S, o.seconds


LIBRARY_RULE_OPTIONS = """
import torch, gaf
m = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
try:
    gaf.GAFTrainer(m, opt, torch.nn.functional.cross_entropy, 2, rule_options=1)
except (TypeError, ValueError) as e:
    print("refused:", e)
"""


LIBRARY_OTHER_OPTIMIZER = """
import torch, gaf
m, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
try:
    gaf.GAFTrainer(m, torch.optim.SGD(other.parameters(), lr=0.1),
                   torch.nn.functional.cross_entropy, 2)
except (TypeError, ValueError) as e:
    print("refused:", e)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    tmp = tmp_path_factory.mktemp("silent")
    a_file = tmp / "a-file"
    a_file.write_text("not a directory\n")
    truncated = tmp / "truncated"
    truncated.mkdir()
    for src in FMNIST.iterdir():
        if src.name.startswith("train-images"):
            data = src.read_bytes()
            (truncated / src.name).write_bytes(data[: len(data) // 3])
        else:
            (truncated / src.name).symlink_to(src)
    grid = tmp / "grid"
    phase1 = {
        "grid": GAF + ["compare", *TINY, "--seed", "0", "--check", "--jobs", "1",
                       "--out", str(grid)],
        "train_size_all": GAF + ["train", "--train-size", "all", "--dry-run"],
        "train_size_big": GAF + ["train", "--train-size", "100000", "--dry-run"],
        "out_is_file": GAF + ["train", *TINY, "--out", str(a_file)],
        "out_below_file": GAF + ["train", *TINY, "--out", str(a_file / "run")],
        "out_unwritable": GAF + ["train", *TINY, "--out", "/proc/gaf-silent-test"],
        "device_cuda": GAF + ["train", *TINY, "--device", "cuda:99"],
        "device_tpu": GAF + ["train", *TINY, "--device", "tpu"],
        "resume_nothing": GAF + ["train", *TINY, "--resume", "--out", str(tmp / "empty")],
        "data_truncated": GAF + ["data", "--data-dir", str(truncated)],
        "data_dir_missing": GAF + ["train", *TINY, "--data-dir", str(tmp / "nowhere")],
        "rule_options": [sys.executable, "-c", LIBRARY_RULE_OPTIONS],
        "other_optimizer": [sys.executable, "-c", LIBRARY_OTHER_OPTIMIZER],
    }
    results: dict[str, Outcome] = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(run, v, tmp) for k, v in phase1.items()}
        results = {k: f.result() for k, f in futures.items()}
    results["grid_dir"] = grid  # type: ignore[assignment]
    # Phase 2, on the grid's checkpoints: the same command with another --tau or --seed.
    phase2 = {
        "resume_tau": GAF + ["compare", *TINY, "--seed", "0", "--tau", "0.95", "--resume",
                             "--out", str(grid)],
        "resume_seed": GAF + ["compare", *TINY, "--seed", "1", "--resume", "--out", str(grid)],
    }
    before = (grid / "results.json").read_bytes() if (grid / "results.json").exists() else b""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(run, v, tmp) for k, v in phase2.items()}
        results.update({k: f.result() for k, f in futures.items()})
    results["results_before"] = before  # type: ignore[assignment]
    return results


def test_train_size_all_uses_and_reports_the_whole_split(outcomes):
    o = outcomes["train_size_all"]
    assert o.returncode == 0 and "Traceback" not in o.out, o.out
    assert "60000 of 60000 training images" in o.out, o.out
    assert "from /usr/share/datasets/fashion-mnist" in o.out


def test_train_size_beyond_the_split_reports_what_was_used(outcomes):
    o = outcomes["train_size_big"]
    assert o.returncode == 0 and "Traceback" not in o.out, o.out
    assert "60000 of 60000 training images" in o.out and "100000" not in o.out.split(";")[0]
    assert "train_size 100000 asked for more than the 60000 training images" in o.out


def test_zero_means_all_too():
    from gaflab.options import ALL, _size_or_all
    assert _size_or_all("0") is ALL and _size_or_all("all") is ALL


def test_grid_runs_say_what_they_trained_on_and_write_strict_json(outcomes):
    o = outcomes["grid"]
    assert "Traceback" not in o.out, o.out
    assert "200 of 60000 training images" in o.out
    assert "seed 0 | symmetric 40% | run 1/2" in o.out  # per-epoch lines say which run
    grid = outcomes["grid_dir"]

    def no_constant(name):
        raise AssertionError(f"non-JSON constant {name} in the output")

    for name in ("check.json", "results.json"):
        text = (grid / name).read_text()
        json.loads(text, parse_constant=no_constant)
    for finished in (grid / "checkpoints").glob("*/result.json"):
        json.loads(finished.read_text(), parse_constant=no_constant)
    doc = json.loads((grid / "results.json").read_text())
    assert all(r["data"]["train_images"] == 200 for r in doc["runs"])


def test_resume_with_another_tau_or_seed_is_refused(outcomes):
    refused(outcomes["resume_tau"], "--resume", "tau: 0.97 in the checkpoint, 0.95 now")
    refused(outcomes["resume_seed"], "--resume", "seed: 0 in the checkpoint, 1 now")
    # ... and nothing was overwritten
    assert (outcomes["grid_dir"] / "results.json").read_bytes() == outcomes["results_before"]


def test_resume_without_checkpoint_is_an_error(outcomes):
    refused(outcomes["resume_nothing"], "no checkpoint in", "nothing to resume")


def test_unwritable_out_fails_before_training(outcomes):
    refused(outcomes["out_is_file"], "is a file, not a directory")
    refused(outcomes["out_below_file"], "cannot be written", "Not a directory")
    refused(outcomes["out_unwritable"], "cannot be written")
    for key in ("out_is_file", "out_below_file", "out_unwritable"):
        assert "epoch" not in outcomes[key].out  # nothing trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: cuda:99 case only")
def test_device_cuda_without_cuda_is_a_clear_error(outcomes):
    refused(outcomes["device_cuda"], "device 'cuda:99'", "--device cpu")


def test_unknown_device_is_a_clear_error(outcomes):
    refused(outcomes["device_tpu"], "unknown device 'tpu'")


def test_truncated_dataset_file_is_named(outcomes):
    refused(outcomes["data_truncated"], "train-images-idx3-ubyte", "truncated or damaged",
            "Delete the damaged file")


def test_missing_data_dir_is_an_error_not_a_fallback(outcomes):
    refused(outcomes["data_dir_missing"], "nowhere does not exist",
            "/usr/share/datasets/fashion-mnist")


def test_rule_options_not_a_mapping_is_named(outcomes):
    o = outcomes["rule_options"]
    assert "Traceback" not in o.out, o.out
    assert "refused:" in o.out and "rule_options" in o.out, o.out


def test_optimizer_over_another_model_is_refused_at_construction(outcomes):
    o = outcomes["other_optimizer"]
    assert "Traceback" not in o.out, o.out
    assert "refused:" in o.out, o.out


def test_no_temporary_files_left(outcomes):
    # The --out probe leaves nothing behind in a directory it could write.
    grid = outcomes["grid_dir"]
    assert not [p for p in grid.iterdir() if p.name.startswith(".gaf-write-probe")]
