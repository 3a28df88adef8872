"""Per-task checkpoints: atomic writes, a content digest, and the RNG states of a run.

A checkpoint is written after each finished task to ``RUN_DIR/checkpoints/task_NN.pt``
(NN is the 1-based task). It is a ``torch.save`` file that ``torch.load(weights_only=True)``
reads: nested dicts and lists of tensors, strings and numbers, no pickled classes. Its
top-level keys are described in docs/checkpoints.md.

A write goes to ``task_NN.pt.tmp``, is flushed and fsynced, then renamed over the final
name, and the directory is fsynced. Older checkpoints are not touched during the write,
so a kill at any moment leaves the last complete checkpoint intact. torch's zip reader
notices a truncated file but not flipped bytes inside a tensor, so each checkpoint also
stores a SHA-256 digest of its content, which :func:`load_checkpoint` recomputes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spherical_cl.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "spherical-cl-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"task_(\d+)\.pt")


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or from another format version."""


def checkpoint_path(run_dir: Path, task: int) -> Path:
    """Return the checkpoint path of 0-based task ``task``: ``checkpoints/task_<task+1>.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"task_{task + 1:02d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Return ``(0-based task, path)`` of every checkpoint file in the run, in task order."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)) - 1, path))
    return sorted(found)


def content_digest(state: Any) -> str:
    """Return the SHA-256 hex digest of a nested structure of tensors and plain values.

    Dict keys are visited in sorted order, and each tensor contributes its dtype, shape and
    raw bytes, so equal content gives an equal digest whatever the insertion order.
    """
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=str):
            digest.update(f"K{key!r}".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r}".encode())


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with a format header and digest to ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    payload["digest"] = content_digest(payload)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(path: Path) -> dict:
    """Load and verify a checkpoint onto the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, from another format or
            version, or its content does not match its digest.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as error:  # torch raises RuntimeError, pickle errors or EOFError on damaged files.
        # torch's messages run to many lines of advice about weights_only; the first clause is the cause.
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{type(error).__name__}: {first.split('. ')[0][:100]}" if first else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spherical-cl checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')!r}; this spherical-cl "
                              f"reads version {VERSION}")
    stored = state.pop("digest", None)
    if stored != content_digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match its digest")
    return state


def latest_checkpoint(run_dir: Path) -> dict | None:
    """Return the newest checkpoint of a run, or None when it has none.

    Raises:
        CheckpointError: the newest checkpoint is damaged. The message names it and the
            last good one, so the user can delete the damaged file and resume from there.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    task, newest = found[-1]
    try:
        return load_checkpoint(newest)
    except CheckpointError as error:
        damaged = [newest]
        for older_task, older in reversed(found[:-1]):
            try:
                load_checkpoint(older)
            except CheckpointError:
                damaged.append(older)
                continue
            names = " and ".join(str(path) for path in reversed(damaged))
            raise CheckpointError(f"{error}; the last good checkpoint is task {older_task + 1} ({older.name}): "
                                  f"delete {names} and run --resume again to continue from it") from None
        raise CheckpointError(f"{error}; none of the {len(found)} checkpoints loads: delete {newest.parent} and "
                              "run --resume again to restart from task 1") from None


def capture_rng() -> dict:
    """Return the states of python's, numpy's and torch's random generators (CPU and CUDA)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Restore the generator states captured by :func:`capture_rng`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("the checkpoint contains CUDA generator states of %d devices but %d are visible; CUDA "
                           "random numbers will differ from the interrupted run", len(cuda), torch.cuda.device_count())
