"""The run directory: resolved config, run info, JSON-lines log, metrics and plots.

A run is complete when ``metrics.json`` exists. It is written last, through a temporary
file and a rename, so a crashed or killed run never leaves one behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from spherical_cl.config import ExperimentConfig, config_hash, to_yaml
from spherical_cl.errors import RunDirError

logger = logging.getLogger(__name__)

# Outputs of a run. A new run in the same directory removes them first.
RUN_FILES = ("metrics.json", "log.jsonl", "config.yaml", "run_info.json")
RUN_FOLDERS = ("plots", "exports", "checkpoints")
# Keys of metrics.json that measure the machine (wall-clock time, memory). On the CPU every
# other value is determined by the config, the seed and the code.
MEASUREMENT_KEYS = ("runtime_s", "peak_memory_mb")
PACKAGES = ("torch", "torchvision", "timm", "peft", "geoopt", "numpy", "scikit-learn", "omegaconf", "spherical-cl")


def default_run_dir(config_path: str | Path | None, root: str | Path = "runs") -> Path:
    """Return ``runs/<config stem>-<YYYYmmdd-HHMMSS>``."""
    stem = Path(config_path).stem if config_path else "default"
    return Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(path: Path, *, overwrite: bool = False) -> None:
    """Create the run directory, or reject one that contains a finished run or is not writable.

    Outputs of an earlier run in the same directory (a crashed one, or a finished one with
    ``overwrite``) are removed first, so the new run's log and exports are its own.

    Raises:
        RunDirError: ``path`` is empty, contains ``metrics.json`` or task checkpoints and
            ``overwrite`` is off, or it cannot be created or written.
    """
    if not str(path).strip():
        raise RunDirError("the run directory is an empty path; give a directory name")
    if (path / "metrics.json").exists() and not overwrite:
        raise RunDirError(f"{path} already contains a finished run (metrics.json); pass --overwrite or choose "
                          "another output directory")
    checkpoints = sorted((path / "checkpoints").glob("task_*.pt")) if path.is_dir() else []
    if checkpoints and not overwrite:
        raise RunDirError(f"{path} contains checkpoints of an unfinished run (newest: {checkpoints[-1].name}); pass "
                          f"--resume {path} to continue it, or --overwrite to start over")
    check_writable(path)
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(path / name, ignore_errors=True)


def check_writable(path: Path) -> None:
    """Create ``path`` if needed and check that a file can be written in it.

    Raises:
        RunDirError: the directory cannot be created or written.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunDirError(f"cannot write to run directory {path}: {error.strerror}; choose another output "
                          "directory") from None


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` while a process writes the run.

    A second process that tries to train or resume the same directory gets a RunDirError
    instead of interleaving its checkpoints and log with the first. The lock is released
    when the holder exits, even after SIGKILL, because the kernel drops it with the file
    descriptor. With ``enabled=False`` (ranks other than 0) it does nothing.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.path = Path(run_dir) / ".lock"
        self.enabled = enabled
        self._handle = None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(f"another process (pid {owner}) is writing {self.path.parent}; wait for it to end or "
                              "choose another output directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            # Unlinking before unlocking means a waiting process never locks a stale file.
            self.path.unlink(missing_ok=True)
            self._handle.close()
            self._handle = None


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and rename."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2, allow_nan=False, default=_json_default)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` through a temporary file, fsync and rename."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def run_info(config: ExperimentConfig, device: str, *, world_size: int = 1) -> dict:
    """Return the git commit, package versions, hardware and config hash of this run."""
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "world_size": world_size,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "packages": versions,
        "hardware": hardware,
        "config_hash": config_hash(config),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")


class RunWriter:
    """Writes the files of one run directory.

    With ``enabled=False`` (ranks other than 0 of a distributed run) every write is skipped.
    """

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = path
        self.log_path = path / "log.jsonl"
        self.enabled = enabled

    def write_start(self, config: ExperimentConfig, info: dict) -> None:
        if not self.enabled:
            return
        self.write_config(config)
        write_json_atomic(self.path / "run_info.json", info)

    def log(self, record: dict) -> None:
        """Append one record to ``log.jsonl``; non-finite floats are written as null."""
        if not self.enabled:
            return
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(_finite_or_none(record), default=_json_default) + "\n")

    def write_config(self, config: ExperimentConfig) -> None:
        """Write ``config.yaml`` atomically (temporary file, fsync, rename)."""
        if not self.enabled:
            return
        write_text_atomic(self.path / "config.yaml", to_yaml(config))

    def sync_log(self) -> int:
        """Flush ``log.jsonl`` to disk and return its size in bytes (0 before the first record)."""
        if not self.log_path.exists():
            return 0
        with open(self.log_path, "rb") as handle:
            os.fsync(handle.fileno())
        return self.log_path.stat().st_size

    def rewind(self, log_size: int, finished_tasks: int) -> None:
        """Drop what an interrupted run wrote after its last checkpoint.

        ``log.jsonl`` is cut back to ``log_size`` bytes, and exports of tasks after the
        first ``finished_tasks`` are removed, so a resumed run appends to a consistent record.
        """
        if not self.enabled:
            return
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        if size > log_size:
            with open(self.log_path, "r+b") as handle:
                handle.truncate(log_size)
        elif size < log_size:
            # Truncating would pad with NUL bytes, so keep what is there and warn that records are lost.
            logger.warning("%s has %d bytes but had %d at the checkpoint of task %d; records of the finished "
                           "tasks are missing from it", self.log_path, size, log_size, finished_tasks)
        for path in (self.path / "exports").glob("task_*_*.safetensors"):
            if int(path.name.split("_")[1]) > finished_tasks:
                path.unlink()
        for path in (self.path / "checkpoints").glob("*.tmp"):
            path.unlink()

    def add_resume(self, record: dict) -> None:
        """Append a resume record to ``run_info.json`` (when, from which task, forced config changes)."""
        if not self.enabled:
            return
        path = self.path / "run_info.json"
        info = json.loads(path.read_text()) if path.exists() else {}
        info.setdefault("resumes", []).append(record)
        write_json_atomic(path, info)

    def export(self, task: int, group: str, tensors: dict) -> Path:
        """Write ``exports/task_<NN>_<group>.safetensors`` with the given tensors; return its path."""
        from safetensors.torch import save_file

        folder = self.path / "exports"
        path = folder / f"task_{task + 1:02d}_{group}.safetensors"
        if not self.enabled:
            return path
        folder.mkdir(exist_ok=True)
        save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(path))
        return path

    def write_metrics(self, metrics: dict) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.path / "metrics.json", _finite_or_none(metrics))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def summary_table(metrics: dict) -> str:
    """Return a plain-text table of the per-task accuracies and the final metrics."""
    predictors = metrics["predictors"]
    names = list(predictors)
    header = ["task", "classes"] + [f"{name} acc" for name in names] + ["old", "new", "time (s)"]
    rows = []
    headline = predictors[metrics["headline"]]
    for i, classes in enumerate(metrics["classes_per_task"]):
        old = headline["a_old"][i]
        rows.append([str(i + 1), str(len(classes))]
                    + [f"{predictors[name]['acc_per_task'][i]:.2f}" for name in names]
                    + ["-" if old is None else f"{old:.2f}", f"{headline['a_new'][i]:.2f}",
                       f"{metrics['runtime_s'][i]:.1f}"])
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(header, widths))]
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]

    def signed(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f}"

    lines.append("")
    lines.append(
        f"headline ({metrics['headline']}): final {metrics['final_acc']:.2f}%  average {metrics['avg_acc']:.2f}%  "
        f"BWT {signed(metrics['bwt'])}  forgetting {signed(metrics['forgetting'])}  "
        f"time {sum(metrics['runtime_s']):.0f} s  peak memory {metrics['peak_memory_mb']:.0f} MB"
    )
    return "\n".join(lines)
