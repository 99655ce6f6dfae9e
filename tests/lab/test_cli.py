from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from gaflab.cli import main
from gaflab.recipes import FIGURE6_AVERAGE, FIGURE6_GAF, RECIPES, get_recipe

from .conftest import write_cifar100, write_cifar_n


def _png_size(path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", raw[16:24])


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--noise-rate", "-0.1"], "negative"),
        (["compare", "--noise-rate", "1.5"], "0.4 means 40%"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--batch-size", "16", "--micro-batch-size", "32"],
         "micro-batch size 32 is larger than the batch size 16"),
        (["train", "--batch-size", "48", "--micro-batch-size", "32"], "not a multiple"),
        (["train", "--tau", "3"], "tau must lie in [0, 2]"),
        (["train", "--epochs", "0"], "positive integer"),
        (["train", "--method", "gaf", "--num-micro-batches", "1"], "at least 2 micro-batches"),
        (["train", "--noise", "human"], "human noise (CIFAR-N) needs dataset cifar10"),
        (["compare", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["train", "--lr", "-1"], "expected a finite number >= 0"),
        (["train", "--batch-size", "64", "--micro-batch-size", "32", "--num-micro-batches",
          "4"], "gives 2 micro-batches"),
        (["report", "/nonexistent/results.json"], "cannot read"),
    ],
)
def test_bad_arguments_are_named(capsys, argv, message):
    assert message in _error(capsys, argv)


def test_missing_dataset_exits_with_instructions(tmp_path, capsys):
    code = main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download",
                 "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and str(tmp_path) in err


def test_compare_writes_results_report_and_plots(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "compare", "--data-dir", str(fmnist_dir), "--train-size", "all", "--epochs", "2",
        "--micro-batch-size", "16", "--tau", "0.97", "2.0", "--noise-rate", "0.3",
        "--seed", "1", "--jobs", "1", "--threads", "1", "--quiet", "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gaf (tau=0.97)" in printed and "average" in printed and "wall time" in printed
    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    assert [r["label"] for r in runs] == ["average", "gaf (tau=0.97)", "gaf (tau=2)"]
    for r in runs:
        s = r["summary"]
        assert s["noise_rate"] == 0.3 and s["seed"] == 1 and s["noise"] == "symmetric"
        assert len(r["history"]) == 2 and r["steps"] == 2 * (320 // 32)
        assert 0 <= s["final_test_acc"] <= 1 and 0 <= s["final_memorised"] <= 1
        assert s["best_test_acc"] >= s["final_test_acc"]
        assert len(r["distance_trace"]) == r["steps"]
    assert runs[0]["summary"]["skip_rate"] == 0.0
    assert runs[2]["summary"]["skip_rate"] == 0.0  # tau = 2 accepts everything
    assert doc["environment"]["torch"]
    assert len(doc["gaf_vs_average"]) == 2
    report = (out / "report.md").read_text()
    assert "| average |" in report and "![curves](curves.png)" in report
    for name in ("curves.png", "distances.png"):
        w, h = _png_size(out / name)
        assert w > 300 and h > 200
    # gaf report redraws the same report from results.json alone
    again = tmp_path / "again"
    assert main(["report", str(out / "results.json"), "--out", str(again)]) == 0
    strip = lambda t: [x for x in t.splitlines() if not x.startswith(("Wall", "torch"))]  # noqa: E731
    assert strip((again / "report.md").read_text()) == strip(report)
    _png_size(again / "curves.png")


def test_compare_sweep_in_two_processes(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main([
        "compare", "--data-dir", str(fmnist_dir), "--train-size", "160", "--epochs", "1",
        "--micro-batch-size", "16", "--noise-rate", "0.2", "0.6", "--methods", "average",
        "--jobs", "2", "--quiet", "--out", str(out), "--no-distances",
    ])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert sorted(r["summary"]["noise_rate"] for r in doc["runs"]) == [0.2, 0.6]
    assert all(r["distance_trace"] == [] for r in doc["runs"])
    _png_size(out / "noise_sweep.png")
    assert not (out / "distances.png").exists()


def test_train_and_probe_commands(fmnist_dir, tmp_path, capsys):
    assert main(["train", "--data-dir", str(fmnist_dir), "--train-size", "128", "--epochs", "1",
                 "--method", "gaf", "--rule", "anchor", "--num-micro-batches", "4",
                 "--micro-batch-size", "8", "--quiet", "--no-plots",
                 "--out", str(tmp_path / "t")]) == 0
    doc = json.loads((tmp_path / "t" / "results.json").read_text())
    assert doc["runs"][0]["config"]["rule"] == "anchor"
    assert doc["runs"][0]["config"]["num_micro_batches"] == 4
    assert main(["probe", "--data-dir", str(fmnist_dir), "--train-size", "128", "--epochs", "1",
                 "--sizes", "2", "8", "--pairs", "3", "--quiet",
                 "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "micro-batch    8" in printed
    probe = json.loads((tmp_path / "p" / "probe.json").read_text())
    rows = probe["by_size"]
    assert {(r["epoch"], r["micro_batch_size"]) for r in rows} == {
        (e, s) for e in (0, 1) for s in (2, 8)}
    assert all(0.0 <= r["min"] <= r["mean"] <= r["max"] <= 2.0 for r in rows)
    assert len(probe["run"]["distance_trace"]) == 128 // 64  # default 2 x 32 per step
    _png_size(tmp_path / "p" / "probe.png")


def test_recipes_carry_the_paper_numbers():
    r = get_recipe("cifar100-sym-sweep")
    assert r.base.dataset == "cifar100" and r.base.model == "resnet18"
    assert r.base.class_balanced and r.base.micro_batch_size == 100
    assert len(r.noise_rates) == len(FIGURE6_GAF) == len(FIGURE6_AVERAGE) == 11
    assert r.paper["gaf (tau=0.97)"][0.4] == 53 and r.paper["average"][0.4] == 38
    assert set(RECIPES) >= {"fmnist-demo", "cifar100-sym-sweep", "cifar100n-fine"}
    r.base.epochs = 1  # a copy: the registry is unchanged
    assert get_recipe("cifar100-sym-sweep").base.epochs == 200


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("cifar100-sym-sweep", ["--noise-rate", "0.4"]),
        ("cifar100n-fine", []),
    ],
)
def test_cifar_recipes_run_a_few_steps_on_real_format_files(tmp_path, capsys, recipe, extra):
    data = write_cifar100(tmp_path, n_train=200, n_test=100).parent
    import pickle

    with open(data / "cifar-100-python" / "train", "rb") as f:
        clean = np.asarray(pickle.load(f, encoding="bytes")[b"fine_labels"])
    write_cifar_n(data / "CIFAR-100_human.pt", clean, 100)
    out = tmp_path / "out"
    # The recipe's models (at width 8) and data pipeline, cut to one step of 2 x 2 images.
    code = main(["compare", "--recipe", recipe, "--data-dir", str(data), "--device", "cpu",
                 "--width", "8",
                 "--train-size", "8", "--test-size", "8", "--no-class-balanced",
                 "--micro-batch-size", "2", "--epochs", "1", "--max-steps", "1",
                 "--jobs", "1", "--threads", "1", "--quiet", "--no-plots", "--out", str(out),
                 *extra])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    cfgs = [r["config"] for r in doc["runs"]]
    assert [c["method"] for c in cfgs] == ["average", "gaf"]
    assert all(c["augment"] and c["weight_decay"] == 1e-2 and c["nesterov"] for c in cfgs)
    if recipe == "cifar100n-fine":
        assert cfgs[0]["model"] == "resnet34" and cfgs[0]["noise"] == "human"
        assert cfgs[0]["human_labels"] == "noisy"
    else:
        assert cfgs[0]["model"] == "resnet18" and doc["runs"][0]["noise_fraction"] == 0.375
        assert "paper" in doc
