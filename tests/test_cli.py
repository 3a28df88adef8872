"""The command line end to end: dry run, input errors, and a short demo run."""

import json

import pytest
from conftest import DEMO, error_line, run_cli

FAST = ["logging.progress=false", "train.epochs_main=3", "data.num_tasks=2", "data.class_order=identity",
        "data.class_list=null"]


def test_dry_run_prints_plan_without_writing(tmp_path):
    result = run_cli("--config", str(DEMO), "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "tasks: 5, classes: 10" in result.stdout
    assert "task 5: 2 classes" in result.stdout
    assert "trainable parameters per task" in result.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=0.1", "did you mean 'train.lr'"),
        ("projection.k_max=0", "projection.k_max is out of range"),
        ("data.num_tasks=11", "more than the 10 classes"),
        ("model.backbone=vit_mikro", "vit_micro"),
        ("method=drs_sphere projection.k_max=64", "must be smaller than the embedding size 64"),
        ("data.source=npz data.root=/nonexistent", "dataset root not found: /nonexistent"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, override, fragment):
    run_dir = tmp_path / "run"
    result = run_cli("--config", str(DEMO), "--run-dir", str(run_dir), *override.split())
    assert fragment in error_line(result)
    assert not run_dir.exists()


def test_demo_run_writes_results(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("--config", str(DEMO), "--run-dir", str(run_dir), *FAST)
    assert result.returncode == 0, result.stderr
    assert "headline (ncm)" in result.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc_matrix", "acc_per_task", "avg_acc", "final_acc", "bwt", "forgetting", "a_old", "a_new",
                "runtime_s", "peak_memory_mb", "classes_per_task"):
        assert key in metrics, key
    assert metrics["classes_per_task"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert len(metrics["acc_matrix"]) == 2
    assert metrics["acc_matrix"][0][1] is None
    assert 0.0 <= metrics["final_acc"] <= 100.0
    assert metrics["avg_acc"] == pytest.approx(sum(metrics["acc_per_task"]) / 2)
    assert set(metrics["predictors"]) == {"classifier", "ncm"}
    # The first task has 5 classes (chance 20%); three epochs must do clearly better.
    assert metrics["acc_per_task"][0] > 35.0

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "epoch" for r in records) == 6
    assert sum(r["type"] == "task" for r in records) == 2
    for name in ("acc_per_task.png", "acc_matrix.png", "old_new.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["packages"]["torch"]
    assert info["hardware"]["cpu_count"] >= 1
    assert "config.yaml" in {p.name for p in run_dir.iterdir()}

    again = run_cli("--config", str(DEMO), "--run-dir", str(run_dir), *FAST)
    assert again.returncode == 2
    assert "already contains a finished run" in again.stderr
