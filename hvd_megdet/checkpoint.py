"""Checkpoints: written by rank 0 atomically (temp file + rename), last K kept, loaded with
``weights_only=True``. They hold model, optimizer, AMP scaler, progress (images seen, iteration,
world size), config and every rank's RNG state.

Files are named by images seen, ``model_img<images>.pth``: the unit of progress that survives a
change of world size (an iteration number does not, so it cannot order checkpoints).

The collective protocol is here too: :func:`save_collective` (every rank's RNG state gathered,
rank 0 writes, a barrier) and :func:`restore` (rank 0 reads, its verdict and the weights reach
every rank). What a restored progress means for a schedule of another world size is the
engine's."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hvd_megdet import dist, rng
from hvd_megdet.errors import UserError

_NAME = re.compile(r"^model_img(\d{10,})\.pth$")
_LEGACY = re.compile(r"^model_(\d{7,})\.pth$")  # named by iteration (before images seen): older than any _NAME


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def path_for(output_dir, images: int) -> Path:
    return checkpoint_dir(output_dir) / f"model_img{images:010d}.pth"


def save(output_dir, images: int, state: dict, keep: int) -> Path:
    """Write ``model_img<images>.pth`` atomically and delete all but the newest ``keep``."""
    d = checkpoint_dir(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = path_for(output_dir, images)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(output_dir) -> list[Path]:
    d = checkpoint_dir(output_dir)
    if not d.is_dir():
        return []
    def order(p: Path):
        m = _NAME.match(p.name)
        return (1, int(m[1])) if m else (0, int(_LEGACY.match(p.name)[1]))
    return sorted((p for p in d.iterdir() if _NAME.match(p.name) or _LEGACY.match(p.name)), key=order)


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the message names the file."""


def load(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated/corrupt: torch's message does not name the file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def newest_valid(output_dir, log=None) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, and its state; unreadable newer ones are skipped with a
    warning naming them (a kill during a save on a filesystem without atomic rename, a full disk)."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load(path)
        except CheckpointError as e:
            if log:
                log.warning("%s: skipped, trying the previous checkpoint", e)
    return None, None


def remove_stale_temporaries(output_dir, log=None) -> None:
    """Temporary files of saves that a kill interrupted (only rank 0 writes: call it there)."""
    d = checkpoint_dir(output_dir)
    for tmp in d.glob("*.tmp") if d.is_dir() else ():
        tmp.unlink(missing_ok=True)
        if log:
            log.warning("removed %s, left by an interrupted save", tmp)


# --- the collective protocol -------------------------------------------------

def save_collective(output_dir, images: int, state: Callable[[], dict], device, keep: int,
                    marker: str | None = None, marker_text: str = "") -> Path | None:
    """Collective: every rank's RNG state is gathered; rank 0 writes ``state()`` + those states,
    then ``marker`` (a file in ``output_dir``, e.g. PREEMPTED), both before the barrier that
    releases the other ranks. Returns the path on rank 0, None elsewhere."""
    rngs = dist.allgather_object(rng.rng_state(device), name=f"ckpt_rng_{images}")
    path = None
    if dist.is_main():
        path = save(output_dir, images, {**state(), "rng": rngs}, keep)
        if marker:  # job scripts requeue on this file, whatever srun's exit code
            (Path(output_dir) / marker).write_text(marker_text)
    dist.barrier(name=f"ckpt_saved_{images}")
    return path


def newest_on_root(output_dir, log=None, remove_temporaries: bool = False) -> tuple[Path | None, dict | None]:
    """Rank 0: the newest readable checkpoint and its state (see :func:`newest_valid`), after
    removing the temporary files of interrupted saves when asked (training only: an evaluation
    must not, a training job may be saving into the same dir). Other ranks: (None, None)."""
    if not dist.is_main():
        return None, None
    if remove_temporaries:
        remove_stale_temporaries(output_dir, log)
    return newest_valid(output_dir, log)


@dataclass(frozen=True)
class Restored:
    path: str
    images: int                 # progress: images seen by all ranks together
    iteration: int              # the checkpoint's own iteration (of its world size's batch)
    world_size: int | None
    rng: list | None            # every rank's RNG state at the save, by rank
    scaler: dict | None


def restore(path, state: dict | None, model, optimizer=None, legacy_global_batch: int = 0) -> Restored | None:
    """Collective: rank 0's ``state`` (loaded from ``path``, by rank 0 here when None) into every
    rank's ``model`` (and ``optimizer``). None when rank 0 has no checkpoint. A checkpoint that
    cannot be read or does not fit the model fails every rank alike. ``legacy_global_batch`` turns the iteration of a checkpoint older than
    the images count into images."""
    path = dist.broadcast_object(str(path) if path else None, name="ckpt_path")
    if path is None:
        return None

    def load_on_root() -> dict:
        nonlocal state
        if state is None:
            state = load(path)  # a CheckpointError here reaches every rank too
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        legacy = state.get("schedule", {}).get("global_batch", legacy_global_batch)
        return {"images": state.get("images", state["iteration"] * legacy), "iteration": state["iteration"],
                "world_size": state.get("world_size"), "rng": state.get("rng"), "scaler": state.get("scaler")}

    meta = dist.root_decides(load_on_root, "ckpt_meta", CheckpointError,
                             catch=(CheckpointError, KeyError, ValueError, RuntimeError),
                             describe=lambda e: str(e) if isinstance(e, CheckpointError) else
                             f"checkpoint {path} does not fit this model/config: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if optimizer is not None:
        # optimizer state first: Horovod initialises empty state with a step, which the
        # parameter broadcast then overwrites.
        dist.broadcast_optimizer_state(optimizer)
    dist.broadcast_parameters(model.state_dict())
    return Restored(path=path, **meta)
