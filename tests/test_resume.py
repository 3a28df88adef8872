"""Checkpoints after each task, --resume after a kill, and what a resume refuses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEMO, SHORT_DEMO, assert_close_tree, error_line, run_cli

from spherical_cl.results import MEASUREMENT_KEYS

DRS = [*SHORT_DEMO, "method=drs_sphere", "train.epochs_warm=1", "train.epochs_main=2"]

KILLER = """
import os, signal, sys
from trainers import incremental

train_epoch = incremental.IncrementalTrainer.train_epoch

def killed_in_task_2(self, loader, optimizer, step, *args):
    if step.task == 1 and step.epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_epoch(self, loader, optimizer, step, *args)

incremental.IncrementalTrainer.train_epoch = killed_in_task_2
from spherical_cl.train import main
sys.exit(main(sys.argv[1:]))
"""


def assert_same_results(resumed: dict, reference: dict) -> None:
    """Assert that two runs' metrics agree on everything but the machine measurements."""
    assert_close_tree({k: v for k, v in resumed.items() if k not in MEASUREMENT_KEYS},
                      {k: v for k, v in reference.items() if k not in MEASUREMENT_KEYS})
    # The accuracy matrix must be identical, not merely close.
    assert resumed["acc_matrix"] == reference["acc_matrix"]


def read_metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def run_in_process(run_dir, *overrides: str) -> dict:
    from spherical_cl.config import load_config
    from trainers.experiment import run_experiment

    return run_experiment(load_config(DEMO, overrides), run_dir)


def resume_in_process(run_dir, *overrides: str, force: bool = False) -> dict:
    from spherical_cl.config import load_config
    from trainers.experiment import resume_experiment

    return resume_experiment(load_config(run_dir / "config.yaml", overrides), run_dir, force=force)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted drs_sphere run of the short demo, by the CLI."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli("--config", str(DEMO), "--run-dir", str(run_dir), *DRS)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_sigkill_in_task_2_then_resume_equals_uninterrupted(tmp_path, reference_run):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run_dir = tmp_path / "run"
    killed = run_cli("--config", str(DEMO), "--run-dir", str(run_dir), *DRS, script=killer)
    assert killed.returncode == -9
    assert not (run_dir / "metrics.json").exists()
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["task_01.pt"]
    # Task 2's first epoch was logged before the kill.
    assert any(r["type"] == "epoch" and r["task"] == 2 for r in read_log(run_dir))

    resumed = run_cli("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_results(read_metrics(run_dir), read_metrics(reference_run))

    # The log is cut back to the checkpoint, so each epoch appears once and matches the reference.
    def epochs(run):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in read_log(run) if r["type"] == "epoch"]

    assert epochs(run_dir) == epochs(reference_run)
    assert sum(r["type"] == "resume" for r in read_log(run_dir)) == 1
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["resumes"][0]["after_task"] == 1
    for name in ("task_03_U.safetensors", "task_03_prototypes.safetensors"):
        from safetensors.torch import load_file

        for key, tensor in load_file(reference_run / "exports" / name).items():
            assert torch.equal(load_file(run_dir / "exports" / name)[key], tensor), (name, key)


@pytest.mark.parametrize("method", ["ncm", "seq_lora", "linear_drs", "drs_sphere_vae"])
def test_resume_after_each_task_equals_uninterrupted(tmp_path, method):
    overrides = [*SHORT_DEMO, "train.epochs_main=2", f"method={method.removesuffix('_vae')}"]
    if method.endswith("_vae"):
        overrides += ["vae.enabled=true", "vae.latent_dim=16", "projection.k_max=8", "train.epochs_warm=1"]
    reference = run_in_process(tmp_path / "reference", *overrides)
    for finished in (1, 2):
        # The state a kill after task `finished` leaves: its checkpoints, no metrics.
        run_dir = tmp_path / f"after_{finished}"
        shutil.copytree(tmp_path / "reference", run_dir)
        (run_dir / "metrics.json").unlink()
        for later in range(finished + 1, 4):
            (run_dir / "checkpoints" / f"task_{later:02d}.pt").unlink()
        assert_same_results(resume_in_process(run_dir), reference)


def test_resume_config_change_needs_force(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "metrics.json").unlink()
    (run_dir / "checkpoints" / "task_03.pt").unlink()

    message = error_line(run_cli("--resume", str(run_dir), "train.lr=0.002", "loss.m_end=0.1"))
    assert "differs from that of " in message
    assert "checkpoints/task_02.pt in" in message
    assert "train.lr (0.01 -> 0.002)" in message
    assert "loss.m_end" in message
    assert "--force" in message

    fixed = error_line(run_cli("--resume", str(run_dir), "data.num_tasks=2", "--force"))
    assert "cannot resume with a changed data.num_tasks" in fixed
    # A random-init backbone is rebuilt from the seed, so the seed can never change.
    assert "cannot resume with a changed seed" in error_line(run_cli("--resume", str(run_dir), "seed=1", "--force"))

    forced = run_cli("--resume", str(run_dir), "train.lr=0.002", "--force")
    assert forced.returncode == 0, forced.stderr
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["resumes"][-1]["changed"] == {"train.lr": [0.01, 0.002]}
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_names_file_and_last_good_task(tmp_path, reference_run, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "metrics.json").unlink()
    (run_dir / "checkpoints" / "task_03.pt").unlink()
    newest = run_dir / "checkpoints" / "task_02.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        # Inside the stored tensors, which torch's zip reader does not check.
        data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    message = error_line(run_cli("--resume", str(run_dir)))
    assert str(newest) in message
    assert "the last good checkpoint is task 1 (task_01.pt)" in message

    newest.unlink()
    resumed = run_cli("--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_results(read_metrics(run_dir), read_metrics(reference_run))


def test_run_dir_with_checkpoints_needs_resume_or_overwrite(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "metrics.json").unlink()
    message = error_line(run_cli("--config", str(DEMO), "--run-dir", str(run_dir), *DRS))
    assert "contains checkpoints of an unfinished run (newest: task_03.pt)" in message
    assert f"--resume {run_dir}" in message
    assert (run_dir / "checkpoints" / "task_03.pt").exists()


def test_plain_resume_uses_newest_checkpoint_config(tmp_path, reference_run):
    from spherical_cl.config import load_config, to_yaml

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "metrics.json").unlink()
    (run_dir / "checkpoints" / "task_03.pt").unlink()
    # What a forced resume with another learning rate leaves when it is killed before task 3 ends.
    original = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(to_yaml(load_config(run_dir / "config.yaml", ["train.lr=0.002"])))

    result = run_cli("--resume", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert (run_dir / "config.yaml").read_text() == original
    assert_same_results(read_metrics(run_dir), read_metrics(reference_run))


def test_resume_of_finished_run_trains_nothing(tmp_path, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    # A finished run needs no checkpoint, so a damaged one does not matter.
    (run_dir / "checkpoints" / "task_03.pt").write_bytes(b"")
    before = (run_dir / "log.jsonl").read_text()
    result = run_cli("--resume", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "headline (ncm)" in result.stdout
    assert (run_dir / "log.jsonl").read_text() == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--resume", "{tmp}/missing"], "no such run directory"),
        (["--resume", str(DEMO)], "is not a directory"),
        (["--resume", "{tmp}"], "no config.yaml"),
        (["--resume", "{tmp}", "--run-dir", "{tmp}/x"], "cannot be combined with --run-dir"),
        (["--config", str(DEMO), "--force"], "--force only applies to --resume"),
    ],
)
def test_resume_argument_errors(tmp_path, args, fragment):
    result = run_cli(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_non_finite_loss_keeps_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    from spherical_cl.methods.drs_sphere import HypersphericalDRS
    from trainers.incremental import NonFiniteLossError

    training_loss = HypersphericalDRS.training_loss

    def nan_in_task_2(self, images, labels, step):
        output = training_loss(self, images, labels, step)
        if step.task == 1:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(HypersphericalDRS, "training_loss", nan_in_task_2)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as caught:
        run_in_process(run_dir, *DRS)
    message = str(caught.value)
    assert "task 2, epoch 1" in message
    assert f"Tasks 1-1 are saved in {run_dir / 'checkpoints'}" in message
    assert f"--resume {run_dir} KEY=VALUE --force" in message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["task_01.pt"]
    assert not (run_dir / "metrics.json").exists()

    monkeypatch.setattr(HypersphericalDRS, "training_loss", training_loss)
    metrics = resume_in_process(run_dir, "train.lr=0.005", force=True)
    assert len(metrics["acc_matrix"]) == 3
    assert (run_dir / "metrics.json").exists()


def test_every_checkpoint_damaged_names_restart(tmp_path):
    from spherical_cl.checkpoint import CheckpointError, latest_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for task in (1, 2):
        (folder / f"task_{task:02d}.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as caught:
        latest_checkpoint(tmp_path)
    assert "none of the 2 checkpoints loads" in str(caught.value)
    assert f"delete {folder}" in str(caught.value)


def test_rewind_never_pads_a_short_log(tmp_path, caplog):
    from spherical_cl.results import RunWriter

    writer = RunWriter(tmp_path)
    writer.log({"type": "epoch", "task": 1})
    size = writer.sync_log()
    writer.rewind(size + 500, finished_tasks=1)
    assert (tmp_path / "log.jsonl").stat().st_size == size
    assert b"\0" not in (tmp_path / "log.jsonl").read_bytes()
    assert "records of the finished tasks are missing" in caplog.text


def test_run_lock_rejects_second_writer(tmp_path):
    import os

    from spherical_cl.errors import RunDirError
    from spherical_cl.results import RunLock

    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=f"another process \\(pid {os.getpid()}\\) is writing {tmp_path}"):
            with RunLock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path):
        pass


def test_interrupt_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    import trainers.experiment
    from spherical_cl.train import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainers.experiment, "run_experiment", interrupted)
    assert main(["--config", str(DEMO), "--run-dir", str(tmp_path / "run")]) == 130
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines() == [
        "error: interrupted; the checkpoints of finished tasks are kept, continue with --resume RUN_DIR"]


def test_keep_checkpoints_prunes_older_ones(tmp_path):
    run_in_process(tmp_path / "run", *SHORT_DEMO, "method=ncm", "logging.keep_checkpoints=1")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["task_03.pt"]
