import json
import subprocess
import sys
from pathlib import Path

import pytest

from spherical_cl.ablate import format_table, summarize_row
from spherical_cl.config import load_config
from spherical_cl.errors import ConfigError
from spherical_cl.presets import parse_rows, row_overrides

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def test_parse_rows():
    assert parse_rows("ncm,0-6") == ["ncm", "0", "1", "2", "3", "4", "5", "6"]
    assert parse_rows("3,1,3") == ["3", "1"]
    for bad in ("8", "3-1", "a-b", ""):
        with pytest.raises(ConfigError):
            parse_rows(bad)


def test_rows_are_cumulative_presets():
    base = load_config(None, ["train.epochs_warm=2", "train.epochs_main=3", "loss.triplet_lambda=0.4"])
    configs = {row: load_config(None, ["train.epochs_warm=2", "train.epochs_main=3", "loss.triplet_lambda=0.4",
                                       *row_overrides(row, base)]) for row in ("0", "1", "2", "3", "4", "5", "6")}
    for row, config in configs.items():
        assert config.train.epochs_warm + config.train.epochs_main == 5, row
    assert configs["0"].method == "seq_lora"
    assert configs["1"].method == "linear_drs"
    two = configs["2"]
    assert (two.method, two.projection.use_U, two.loss.anneal, two.prototypes.ema, two.loss.triplet_lambda,
            two.train.epochs_warm) == ("drs_sphere", False, "none", False, 0.0, 0)
    assert configs["3"].projection.use_U
    assert configs["3"].loss.triplet_lambda == 0.0
    assert configs["4"].loss.triplet_lambda == 0.4
    assert not configs["4"].prototypes.ema
    assert configs["5"].prototypes.ema and configs["5"].train.epochs_warm == 0
    assert configs["6"].train.epochs_warm == 2
    assert configs["6"].loss.anneal == "linear"
    seven = load_config(None, ["train.epochs_warm=2", "train.epochs_main=3", "loss.triplet_lambda=0.4",
                               *row_overrides("7", base), "projection.k_max=16"])
    assert seven.vae.enabled
    assert not configs["6"].vae.enabled
    seven.vae.enabled = False
    seven.projection.k_max = configs["6"].projection.k_max
    assert seven == configs["6"]


def test_summary_mean_and_std():
    runs = [{"final_acc": 50.0, "avg_acc": 60.0, "bwt": -10.0, "forgetting": 12.0, "geodesic_drift": [None, 0.1],
             "stability_gap": [None, -5.0], "runtime_s": [1.0, 2.0], "peak_memory_mb": 100.0},
            {"final_acc": 54.0, "avg_acc": 62.0, "bwt": -8.0, "forgetting": 10.0, "geodesic_drift": [None, 0.3],
             "stability_gap": [None, -3.0], "runtime_s": [2.0, 2.0], "peak_memory_mb": 120.0}]
    summary = summarize_row(runs)
    assert summary["final_acc"] == pytest.approx((52.0, 2.8284271247461903))
    assert summary["final_drift"][0] == pytest.approx(0.2)
    assert summary["wall_time_s"][0] == pytest.approx(3.5)
    table = format_table({"0": runs}, {"0": "sequential LoRA"}, "note")
    assert "| 0 | sequential LoRA | 2 | 52.00 ± 2.83 |" in table


def test_ablation_command_runs_and_skips_finished_rows(tmp_path):
    out = tmp_path / "ablation"
    args = [sys.executable, "-m", "spherical_cl.ablate", "--config", str(DEMO), "--rows", "ncm,0-6",
            "--out", str(out), "logging.progress=false", "data.num_tasks=2", "train.epochs_warm=1",
            "train.epochs_main=1"]
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    table = (out / "ablation.md").read_text()
    for row in ("ncm", "0", "1", "2", "3", "4", "5", "6"):
        assert f"| {row} |" in table
        metrics = json.loads((out / f"row-{row}" / "seed-0" / "metrics.json").read_text())
        assert 0.0 <= metrics["final_acc"] <= 100.0
        assert len(metrics["acc_matrix"]) == 2
    assert (out / "ablation.png").stat().st_size > 1000
    metrics = json.loads((out / "row-2" / "seed-0" / "metrics.json").read_text())
    assert metrics["method"] == "drs_sphere"
    stamp = (out / "row-0" / "seed-0" / "metrics.json").stat().st_mtime_ns
    # Row 3 as a kill during its second task leaves it: the first task's checkpoint, no metrics.
    interrupted = out / "row-3" / "seed-0"
    before = json.loads((interrupted / "metrics.json").read_text())
    (interrupted / "metrics.json").unlink()
    (interrupted / "checkpoints" / "task_02.pt").unlink()

    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr
    assert "finished earlier" in second.stderr
    assert f"resuming {interrupted} after task 1 of 2" in second.stderr
    assert (out / "row-0" / "seed-0" / "metrics.json").stat().st_mtime_ns == stamp
    after = json.loads((interrupted / "metrics.json").read_text())
    assert after["acc_matrix"] == before["acc_matrix"]

    bad = subprocess.run([*args[:6], "ncm,8", *args[7:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "unknown ablation rows ['8']" in bad.stderr.splitlines()[-1]
