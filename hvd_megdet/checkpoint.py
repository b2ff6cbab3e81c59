"""Checkpoints: written by rank 0 atomically (temp file + rename), last K kept, loaded with
``weights_only=True``. They hold model, optimizer, AMP scaler, progress (images seen, iteration,
world size), config and every rank's RNG state.

Files are named by images seen, ``model_img<images>.pth``: the unit of progress that survives a
change of world size (an iteration number does not, so it cannot order checkpoints)."""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from hvd_megdet.errors import UserError

_NAME = re.compile(r"^model_img(\d{10,})\.pth$")
_LEGACY = re.compile(r"^model_(\d{7,})\.pth$")  # named by iteration (before images seen): older than any _NAME


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only); on a
    GPU rank, the CUDA generator of ``device`` (its own GPU, not the current default)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


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
