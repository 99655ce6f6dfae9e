"""gaf train / gaf compare as real processes: SIGKILL and --resume, Ctrl-C, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gaf
from gaflab import checkpoint as ck
from gaflab.cli import main

SRC = str(Path(gaf.__file__).resolve().parents[1])
TIME_FIELDS = {"epoch_seconds"}  # wall-clock: differs between any two runs


def tiny_args(data_dir, out, *extra):
    # 320 images, 2 x 16 per step: 10 steps an epoch
    return ["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--no-download",
            "--train-size", "all", "--micro-batch-size", "16", "--num-micro-batches", "2",
            "--width", "4", "--threads", "1", "--quiet", "--no-plots", "--out", str(out),
            *extra]


def start(command, data_dir, out, *extra):
    env = dict(os.environ, PYTHONPATH=SRC)
    # A runner that starts jobs with SIGINT ignored (nohup, some CI shells) passes that on, and
    # Python then installs no KeyboardInterrupt handler: give the child the default back.
    return subprocess.Popen([sys.executable, "-m", "gaflab.cli", command,
                             *tiny_args(data_dir, out, *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, proc, timeout=120.0, what=""):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def runs_of(out):
    return json.loads((Path(out) / "results.json").read_text())["runs"]


def without_time(run):
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in run["history"]]


def final_model(out):
    (last,) = Path(out).glob(f"checkpoints/*/{ck.LAST}")
    return ck.read_checkpoint(last)["model"]


def test_sigkill_after_the_first_checkpoint_then_resume_equals_uninterrupted(fmnist_dir,
                                                                             tmp_path):
    extra = ("--method", "gaf", "--epochs", "5", "--checkpoint-every", "4")
    killed = tmp_path / "killed"
    proc = start("train", fmnist_dir, killed, *extra)
    wait_for(lambda: any(killed.glob(f"checkpoints/*/{ck.LAST}")), proc, what="a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists()  # it died before the end
    assert main(["train", *tiny_args(fmnist_dir, killed, *extra, "--resume")]) == 0
    reference = tmp_path / "reference"
    assert main(["train", *tiny_args(fmnist_dir, reference, *extra)]) == 0
    (a,), (b,) = runs_of(killed), runs_of(reference)
    assert len(a["history"]) == 5
    assert without_time(a) == without_time(b)
    assert (a["distance_trace"], a["steps"], a["skipped_steps"]) == \
        (b["distance_trace"], b["steps"], b["skipped_steps"])
    ma, mb = final_model(killed), final_model(reference)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_resume_with_other_settings_is_refused_naming_the_field(fmnist_dir, tmp_path, capsys):
    args = tiny_args(fmnist_dir, tmp_path, "--epochs", "1")
    assert main(["train", *args]) == 0
    capsys.readouterr()
    assert main(["train", *args, "--lr", "0.2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.05" in err and "0.2 now" in err and "another configuration" in err


def test_resume_needs_out(fmnist_dir, capsys):
    args = [a for a in tiny_args(fmnist_dir, "x", "--epochs", "1") if a not in ("--out", "x")]
    with pytest.raises(SystemExit):
        main(["train", *args, "--resume"])
    assert "--resume continues the runs checkpointed in --out" in capsys.readouterr().err


def _children(pid):
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigint_to_compare_writes_finished_runs_and_leaves_no_workers(fmnist_dir, tmp_path):
    out = tmp_path / "grid"
    # 4 runs, 2 at a time: interrupt once the first two have finished
    proc = start("compare", fmnist_dir, out, "--methods", "average", "gaf", "--seed", "0", "1",
                 "--epochs", "12", "--jobs", "2")
    finished = lambda: len(list(out.glob("checkpoints/*/result.json")))  # noqa: E731
    wait_for(lambda: finished() >= 1, proc, timeout=240, what="a finished run")
    workers = _children(proc.pid)
    assert workers, "no worker processes seen"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr
    done = finished()
    assert 1 <= done < 4, "the grid was not interrupted in the middle"
    assert len(runs_of(out)) == done  # results.json holds exactly the finished runs
    time.sleep(0.5)
    assert [p for p in workers if _alive(p)] == []
    # --resume skips the finished runs (their records stay as written) and completes the grid
    records = {p: p.stat().st_mtime_ns for p in out.glob("checkpoints/*/result.json")}
    assert main(["compare", *tiny_args(fmnist_dir, out, "--methods", "average", "gaf",
                                       "--seed", "0", "1", "--epochs", "12", "--jobs", "1",
                                       "--resume")]) == 0
    assert len(runs_of(out)) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in records.items())


def test_train_with_bf16_and_channels_last_from_the_command_line(fmnist_dir, tmp_path):
    out = tmp_path / "fast"
    assert main(["train", *tiny_args(fmnist_dir, out, "--epochs", "1", "--amp", "bf16",
                                     "--channels-last")]) == 0
    (run,) = runs_of(out)
    assert run["config"]["amp"] == "bf16" and run["config"]["channels_last"] is True
    assert len(run["history"]) == 1 and run["history"][0]["test_acc"] > 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_exit_when_compare_is_killed(fmnist_dir, tmp_path):
    out = tmp_path / "grid"
    proc = start("compare", fmnist_dir, out, "--methods", "average", "gaf", "--epochs", "50",
                 "--jobs", "2", "--checkpoint-every", "1")
    # both workers are training once each run has written a checkpoint
    wait_for(lambda: len(list(out.glob(f"checkpoints/*/{ck.LAST}"))) == 2, proc, timeout=240,
             what="two runs training")
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    t0 = time.monotonic()
    while [p for p in workers if _alive(p)] and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert [p for p in workers if _alive(p)] == []
