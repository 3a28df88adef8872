"""Every bad input of the checklist, through the command line: one error line, exit code 2, no run.

The cases call :func:`spherical_cl.train.main`, the function behind ``python -m
spherical_cl.train``, in this process. ``test_cli.py`` checks the same path in a
subprocess for a few cases, including the absence of a traceback on stderr.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DEMO, SHORT_DEMO, write_npz_dataset

BAD_NPZ = {
    "missing_x": ({"y": np.arange(4) % 2}, "lacks array(s) ['x']"),
    "missing_y": ({"x": np.zeros((4, 8, 8, 3), np.uint8)}, "lacks array(s) ['y']"),
    "length_mismatch": ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.arange(3) % 2},
                        "x has 4 images but y has 3 labels"),
    "float_labels": ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0.0, 1.5, 0.0, 1.0])},
                     "y has dtype float64; expected integer class ids"),
    "negative_label": ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0, 1, -1, 1])},
                       "negative label -1"),
    "label_out_of_range": ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0, 1, 5000, 1])},
                           "labels go up to 5000"),
    "image_rank": ({"x": np.zeros((4, 8), np.uint8), "y": np.arange(4) % 2}, "x has shape (4, 8)"),
    "labels_with_gaps": ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.array([0, 1, 3, 1])},
                         "first missing: [2, 4, 5]"),
}


def run_main(capsys, *args: str) -> tuple[int, str]:
    from spherical_cl.train import main

    code = main([*args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last, (fragment, last)


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_arrays(tmp_path, capsys, case):
    arrays, fragment = BAD_NPZ[case]
    root = write_npz_dataset(tmp_path / "npz")
    np.savez(root / "train.npz", **arrays)
    run_dir = tmp_path / "run"
    code, stderr = run_main(capsys, "--config", str(DEMO), "--run-dir", str(run_dir), "data.source=npz",
                            f"data.root={root}")
    assert_one_line_error(code, stderr, str(root / "train.npz"), fragment)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["data.source=npz", "data.root=/no/such/dataset"], ["dataset root not found: /no/such/dataset",
                                                             "set data.root"]),
        (["data.num_tasks=11"], ["data.num_tasks=11", "more than the 10 classes"]),
        (["data.num_tasks=3", "data.remainder=error"],
         ["10 classes do not divide into tasks of 3", "data.remainder=first"]),
        (["method=drs_sphere", "projection.k_max=100"], ["projection.k_max=100",
                                                         "must be smaller than the embedding size 64"]),
        (["projection.pca_energy=0"], ["projection.pca_energy", "out of range", "> 0"]),
        (["projection.pca_energy=1.5"], ["projection.pca_energy", "out of range", "<= 1"]),
        (["train.lr=-0.001"], ["-0.001 for train.lr", "> 0"]),
        (["train.ema_momentum=1.0"], ["1.0 for train.ema_momentum", "< 1"]),
        (["train.ema_momentum=-0.5"], ["-0.5 for train.ema_momentum", ">= 0"]),
        (["model.backbone=vit_b16_in21", "model.pretrained=false"], ["unknown backbone 'vit_b16_in21'",
                                                                     "vit_b16_in21k"]),
        (["model.backbone=mobilenet_v3", "model.pretrained=false"], ["unknown backbone", "mobilenet_v2"]),
    ],
)
def test_bad_config_values(tmp_path, capsys, overrides, fragments):
    run_dir = tmp_path / "run"
    code, stderr = run_main(capsys, "--config", str(DEMO), "--run-dir", str(run_dir), *overrides)
    assert_one_line_error(code, stderr, *fragments)
    assert not run_dir.exists()


def test_weights_that_cannot_be_downloaded_name_offline_options(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    for backbone in ("vit_b16_in21k", "resnet18"):
        code, stderr = run_main(capsys, "--config", str(DEMO), "--run-dir", str(tmp_path / "run"),
                                f"model.backbone={backbone}", "model.pretrained=true")
        assert_one_line_error(code, stderr, "model.checkpoint")
        assert "TORCH_HOME" in stderr or "HF_HUB_OFFLINE" in stderr or "HF_HOME" in stderr
    assert not (tmp_path / "run").exists()


def test_finished_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    code, stderr = run_main(capsys, "--config", str(DEMO), "--run-dir", str(run_dir))
    assert_one_line_error(code, stderr, f"{run_dir} already contains a finished run", "--overwrite")
    assert (run_dir / "metrics.json").read_text() == "{}"


def test_unwritable_run_dir_is_found_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, stderr = run_main(capsys, "--config", str(DEMO), "--run-dir", str(blocker / "run"), *SHORT_DEMO)
    assert_one_line_error(code, stderr, f"cannot write to run directory {blocker / 'run'}",
                          "choose another output directory")
    assert "epoch" not in stderr.lower()


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    code, stderr = run_main(capsys, "--config", str(DEMO), "--run-dir", str(tmp_path / "run"), "--debug",
                            "data.num_tasks=11")
    assert code == 2
    assert "Traceback" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: ")
