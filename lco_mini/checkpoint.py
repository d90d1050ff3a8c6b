"""Checkpoints that survive a crash: atomic writes and the full random state.

A checkpoint is a plain dict (nanoGPT style): the trainable weights, the optimizer,
the step, the config, and every random generator's state, so that a run resumed
after SIGKILL draws the same batches and dropout masks as one never interrupted.

Atomic: the dict is written to a temporary file in the same folder, flushed to
disk, then renamed over the old checkpoint. A rename within one file system is
atomic, so a kill at any moment leaves either the old or the new checkpoint,
never half of one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(obj: dict, path: str | Path) -> None:
    """Write obj to path atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict | None:
    """The checkpoint at path, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    # weights_only=False: the dict holds numpy RNG state and the config, written by us.
    return torch.load(path, map_location="cpu", weights_only=False)


def trainable_state(model: torch.nn.Module) -> dict:
    """Only the parameters being trained: a LoRA checkpoint stays small."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}
