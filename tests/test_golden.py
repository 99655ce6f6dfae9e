"""Golden runs: refactors must not change a decision or a bit.

Fixed seeds, 20 steps of :class:`gaf.GAFTrainer` for every rule and mode (and the other
measures), plus one short run of the experiment loop for averaging and for GAF. Each run is
summarised by

* the sequence of accepted masks (exact on any machine: a changed decision is a changed
  behaviour),
* a SHA-256 of the final parameters' bytes (exact on the machine the file was recorded on),
* per-tensor sums (float64) compared within 1e-5 relative, for machines whose kernels round
  differently from the recording machine (other CPU ISA or torch build).

The hashes are compared when the machine fingerprint (torch version, CPU capability,
architecture) matches the one recorded; otherwise the masks and sums are. Regenerate with
``GAF_GOLDEN_WRITE=1 pytest tests/test_golden.py`` only when a behaviour change is intended,
and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import gaf

GOLDEN = Path(__file__).with_name("golden.json")
WRITE = os.environ.get("GAF_GOLDEN_WRITE") == "1"

TRAINER_CASES = [
    ("mean", "streaming", "cosine"),
    ("halving", "streaming", "cosine"),
    ("mean", "stacked", "cosine"),
    ("halving", "stacked", "cosine"),
    ("anchor", "stacked", "cosine"),
    ("neighbours", "stacked", "cosine"),
    ("mean", "stacked", "sign"),
    ("mean", "stacked", "layerwise"),
]


def fingerprint() -> dict:
    return {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def summarise(params, masks) -> dict:
    flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().contiguous().cpu().numpy().tobytes())
    return {
        "masks": masks,
        "sha256": digest.hexdigest(),
        "sums": [float(p.detach().double().sum()) for p in params],
        "abs_sum": float(flat.abs().sum()),
    }


def trainer_run(rule: str, mode: str, measure: str) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    tau = 0.98 if measure == "cosine" else 0.9
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, num_micro_batches=4, tau=tau,
                             rule=rule, mode=mode, measure=measure, max_grad_norm=5.0)
    gen = torch.Generator().manual_seed(1)
    w_true = torch.randn(12, 4, generator=gen)
    masks = []
    for _ in range(20):
        x = torch.randn(32, 12, generator=gen)
        y = (x @ w_true).argmax(1)
        # Label noise so that some micro-batches disagree.
        flip = torch.rand(32, generator=gen) < 0.4
        y = torch.where(flip, torch.randint(0, 4, (32,), generator=gen), y)
        out = trainer.step(x, y)
        masks.append("".join("1" if a else "0" for a in out.result.accepted.tolist()))
    return summarise(list(model.parameters()), masks)


def experiment_run(method: str) -> dict:
    from gaflab.config import TrainConfig
    from gaflab.prepare import PreparedData
    from gaflab.train import train

    gen = torch.Generator().manual_seed(5)
    n, k = 256, 10
    clean = torch.randint(0, k, (n,), generator=gen)
    x = torch.randn(n, 1, 28, 28, generator=gen) * 0.3
    for c in range(k):  # a class-dependent bright patch makes the task learnable
        x[clean == c, 0, 2 * c : 2 * c + 3, 2 * c : 2 * c + 3] += 2.0
    noisy = torch.rand(n, generator=gen) < 0.3
    y = torch.where(noisy, (clean + 1 + torch.randint(0, k - 1, (n,), generator=gen)) % k, clean)
    data = PreparedData(train_x=x, train_y=y, clean_y=clean, is_noisy=y != clean,
                        test_x=x[:64], test_y=clean[:64], num_classes=k, in_channels=1,
                        image_size=28, noise_fraction=float((y != clean).float().mean()),
                        source="golden")
    cfg = TrainConfig(method=method, epochs=2, train_size=None, micro_batch_size=16,
                      num_micro_batches=2, tau=0.97, lr=0.05, progress=False, threads=1,
                      download=False, seed=3)
    result = train(cfg, data=data)
    params = list(result.model.parameters())
    masks = [f"{h['skip_rate']:.6f}" for h in result.history]
    out = summarise(params, masks)
    out["test_acc"] = [round(h["test_acc"], 6) for h in result.history]
    return out


def all_runs() -> dict:
    torch.set_num_threads(1)
    runs = {f"trainer/{r}/{m}/{me}": trainer_run(r, m, me) for r, m, me in TRAINER_CASES}
    for method in ("average", "gaf"):
        runs[f"experiment/{method}"] = experiment_run(method)
    return runs


@pytest.fixture(scope="module")
def runs() -> dict:
    threads = torch.get_num_threads()
    try:
        return all_runs()
    finally:
        torch.set_num_threads(threads)


def test_golden_runs_unchanged(runs):
    if WRITE:
        GOLDEN.write_text(json.dumps({"fingerprint": fingerprint(), "runs": runs}, indent=1))
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden["runs"]) == sorted(runs)
    same_machine = golden["fingerprint"] == fingerprint()
    for name, want in golden["runs"].items():
        got = runs[name]
        assert got["masks"] == want["masks"], f"{name}: decisions changed"
        if same_machine:
            assert got["sha256"] == want["sha256"], f"{name}: parameters changed"
        else:
            assert got["sums"] == pytest.approx(want["sums"], rel=1e-5, abs=1e-6), name
            assert got["abs_sum"] == pytest.approx(want["abs_sum"], rel=1e-5), name
        if "test_acc" in want:
            assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1e-6), name


def test_golden_runs_are_not_trivial(runs):
    """The cases exercise both verdicts: some rows rejected, some steps taken."""
    for name, run in runs.items():
        if name.startswith("trainer/"):
            joined = "".join(run["masks"])
            assert "0" in joined and "1" in joined, name
    gaf_skips = [float(s) for s in runs["experiment/gaf"]["masks"]]
    assert any(s > 0 for s in gaf_skips)
