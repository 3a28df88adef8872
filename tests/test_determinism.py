"""The same config and seed on the CPU give the same metrics.json, and another seed does not."""

from __future__ import annotations

import json

from conftest import DEMO, SHORT_DEMO

from spherical_cl.results import MEASUREMENT_KEYS

ROW_6 = [*SHORT_DEMO, "method=drs_sphere", "train.epochs_warm=1", "train.epochs_main=2",
         "data.augment=flip", "data.num_workers=0"]


def results(run_dir) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key not in MEASUREMENT_KEYS}


def test_same_seed_gives_identical_metrics(tmp_path):
    from spherical_cl.config import load_config
    from trainers.experiment import run_experiment

    for name, seed in (("first", 0), ("second", 0), ("other_seed", 1)):
        run_experiment(load_config(DEMO, [*ROW_6, f"seed={seed}"]), tmp_path / name)
    first, second = results(tmp_path / "first"), results(tmp_path / "second")
    # Exact equality of the serialised text: every float to the last digit.
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert results(tmp_path / "other_seed")["acc_matrix"] != first["acc_matrix"]
