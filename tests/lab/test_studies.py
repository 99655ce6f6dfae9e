"""The studies (gaflab.studies): the shared step against torch.optim.SGD, the committed tables
regenerated from the committed raw results, and each study run end to end at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gaflab.cli import main as gaf_main
from gaflab.models import MLP
from gaflab.studies import agreement_report, faults, thresholds, thresholds_report
from gaflab.studies.common import parse_noise, sgd_step, stacked_copies

from .conftest import write_idx_dataset

ROOT = Path(__file__).resolve().parents[2]
RESULTS, DOCS = ROOT / "results", ROOT / "docs"


class Hyper:
    lr, momentum, weight_decay = 0.05, 0.9, 5e-4


def test_masked_sgd_step_is_torch_sgd_for_stepping_copies_and_a_no_op_for_the_others():
    torch.manual_seed(0)
    model = MLP(8)
    names, params, bufs = stacked_copies(model, 2)
    start = {k: v.clone() for k, v in params.items()}
    reference = MLP(8)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=Hyper.lr, momentum=Hyper.momentum,
                          nesterov=True, weight_decay=Hyper.weight_decay)
    size = sum(params[k][0].numel() for k in names)
    for _ in range(3):
        direction = torch.randn(2, size)
        offset = 0
        for p in reference.parameters():
            p.grad = direction[0, offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        sgd_step(params, bufs, direction, torch.tensor([True, False]), names, Hyper)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name][0], p.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(params[name][1], start[name][1])  # skipped: not moved
        assert torch.count_nonzero(bufs[name][1]) == 0  # nor its momentum


def test_noise_names():
    assert parse_noise("sym40") == ("symmetric", 0.4)
    assert parse_noise("asym20") == ("asymmetric", 0.2)
    with pytest.raises(ValueError, match="symN or asymN"):
        parse_noise("40")
    with pytest.raises(ValueError, match="symN or asymN"):
        parse_noise("symx")


# -- every committed table regenerates from the committed raw results ----------------------


def test_agreement_tables_regenerate_from_the_raw_results():
    results = agreement_report.load(RESULTS / "agreement" / "raw")
    committed = (DOCS / "agreement" / "tables.md").read_text()
    names = [line[2:].split("]")[0] for line in committed.splitlines() if line.startswith("![")]
    assert names and all((DOCS / "agreement" / n).is_file() for n in names)
    groups = sorted({agreement_report.group_key(r) for r in results})
    assert names == [agreement_report.curve_name(k) for k in groups]
    assert agreement_report.tables(results, names) == committed


@pytest.mark.parametrize("stem", ["results", "heldout"])
def test_thresholds_tables_regenerate_from_the_raw_results(stem):
    res = json.loads((RESULTS / "thresholds" / f"{stem}.json").read_text())
    assert thresholds_report.tables(res) == (DOCS / "study" / f"{stem}-tables.md").read_text()


def test_fault_study_page_regenerates_from_the_raw_results(tmp_path):
    page = tmp_path / "fault-study.md"
    assert faults.main(["--report-only", "--report", str(page)]) == 0
    assert page.read_text() == (DOCS / "fault-study.md").read_text()


# -- the studies run (tiny sizes, synthetic files in the real formats) ---------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("fmnist"), n_train=400, n_test=100)


def test_thresholds_study_runs_and_reports(data_dir, tmp_path):
    out = tmp_path / "r.json"
    assert gaf_main(["study", "thresholds", "--datasets", "fashion-mnist", "--noise", "sym40",
                     "--seeds", "0", "--train-size", "256", "--epochs", "2", "--eval-every",
                     "1", "--hidden", "16", "--data-dir", str(data_dir),
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["runs"]) == len(thresholds.METHOD_SETS["main"]())
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in res["runs"])
    assert {r["method"]: r["skip_rate"] for r in res["runs"]}["average (tau=2)"] == 0.0
    text = thresholds_report.tables(res)
    assert "fixed 0.97" in text and "Target check" in text


def test_agreement_study_runs_resumes_and_reports(data_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    args = ["study", "agreement", "--tier", "5", "--seeds", "0", "--train-size", "300",
            "--test-size", "100", "--epochs", "2", "--eval-every", "1", "--hidden", "16",
            "--data-dir", str(data_dir), "--out", str(raw)]
    assert gaf_main(args) == 0
    files = sorted(p.name for p in raw.glob("*.json"))
    assert files == ["fashion-mnist_sym40_2x64_by-noise_s0.json",
                     "fashion-mnist_sym40_2x64_random_s0.json"]
    capsys.readouterr()
    assert gaf_main(args) == 0  # every setting done: nothing is trained again
    assert capsys.readouterr().out == ""
    results = agreement_report.load(raw)
    text = agreement_report.tables(results, [])
    assert "control:gaf 0.97" in text and "## Headline" in text


def test_study_errors_name_the_problem(data_dir, tmp_path):
    with pytest.raises(ValueError, match="symN or asymN"):
        gaf_main(["study", "thresholds", "--noise", "40", "--datasets", "fashion-mnist",
                  "--data-dir", str(data_dir), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="no raw results"):
        gaf_main(["study", "agreement-report", "--raw", str(tmp_path / "none"),
                  "--out", str(tmp_path)])
