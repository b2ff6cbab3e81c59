"""Seeding and the RNG state of a process (python, numpy, torch, this rank's GPU), saved per rank in
checkpoints so that a resume on the same world size continues bit for bit."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int, rank: int = 0, salt: int = 0) -> int:
    """Seed python, numpy and torch (all devices) with ``seed + rank``, mixed with ``salt`` when
    given (e.g. images seen, to re-derive streams on resume). Returns the seed used."""
    s = seed + rank
    if salt:
        s = (s * 1_000_003 + salt) % 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


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
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
