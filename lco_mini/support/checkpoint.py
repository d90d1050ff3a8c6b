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


def saved_rng(path: str | Path, seed: int) -> dict | None:
    """The random state saved in the checkpoint at `path`, if there is one and it was written with
    `seed`; else None. train.py and rerun.py read the pretraining checkpoint's: the contrastive stage
    then starts from the same random state, so draws the same LoRA initialisation, whether it runs
    right after pretraining, after --resume, alone, or on another base (analyze.py)."""
    state = load(path)
    return None if state is None or state["config"].get("seed") != seed else state["rng"]


def restore_rng(path: str | Path, seed: int) -> bool:
    """set_rng_state(saved_rng(path, seed)) when there is one; False (nothing changed) otherwise."""
    state = saved_rng(path, seed)
    if state is not None:
        set_rng_state(state)
    return state is not None


def save(obj: dict, path: str | Path) -> None:
    """Write obj to path atomically (temp file + fsync + rename). A write that fails (a full disk)
    removes the partial file and raises CheckpointError: the last good checkpoint stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # ENOSPC, or torch's "enforce fail ... unexpected pos"
        tmp.unlink(missing_ok=True)
        raise CheckpointError(write_failure(path, e, path if path.exists() else None)) from None
    os.replace(tmp, path)


def write_failure(path: Path, error: Exception, kept: Path | None) -> str:
    """One line: what could not be written, why, and what is kept."""
    reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
    if "unexpected pos" in reason or "file write failed" in reason:  # how torch.save reports a full disk
        reason = f"the write stopped: no space left on the device? ({reason})"
    last = f"the last good checkpoint {kept} is kept" if kept else "no earlier checkpoint of this stage exists"
    return f"could not write {path}: {reason}; the partial file was removed, {last}"


KEYS = ("model", "optimizer", "rng", "step", "losses", "config")  # what train.py writes


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def load(path: str | Path, keys=KEYS) -> dict | None:
    """The checkpoint at path, or None when there is none; an unreadable one, or one without all
    of `keys`, is a CheckpointError (a file cut short by a full disk, or not ours) rather than a
    traceback from deep in pickle."""
    path = Path(path)
    if not path.exists():
        return None
    try:  # weights_only=False: the dict holds numpy RNG state and the config, written by us
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ... on a bad file
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason}); "
                              f"delete it to restart that stage, or pass --overwrite") from None
    missing = sorted(set(keys) - set(state)) if isinstance(state, dict) else sorted(keys)
    if missing:
        raise CheckpointError(f"{path}: not the file expected here (it lacks the keys {', '.join(missing)})")
    return state


def load_trainable(model: torch.nn.Module, state: dict, path) -> None:
    """Load the trainable weights of `state` into model, strictly: the checkpoint must hold every
    trainable parameter, nothing else, in the same shapes (a silent partial load would resume a
    different model)."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state["model"])), sorted(set(state["model"]) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model being trained: {len(missing)} trainable "
                              f"weights missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    try:
        model.load_state_dict(state["model"], strict=False)  # strict=False: frozen weights are not in it
    except RuntimeError as e:  # a shape mismatch
        raise CheckpointError(f"{path}: does not fit the model being trained ({' '.join(str(e).split())[:300]})") from None


def config_changes(saved: dict, current: dict, keys) -> list[str]:
    """'key: saved -> current' for each of keys whose value differs (keys the saved config lacks,
    from an older version, are not compared)."""
    return [f"{key} {saved[key]!r} -> {current.get(key)!r}" for key in keys
            if key in saved and saved[key] != current.get(key)]


def trainable_state(model: torch.nn.Module) -> dict:
    """Only the parameters being trained: a LoRA checkpoint stays small."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}
