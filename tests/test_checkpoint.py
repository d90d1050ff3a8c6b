"""lco_mini/support/checkpoint.py: a checkpoint is either the old one or the new one, never half of each;
every RNG comes back; an unreadable file is a one-line CheckpointError naming it."""
import random

import numpy as np
import pytest
import torch

from lco_mini.support import checkpoint

STATE = {"model": {"w": torch.arange(6.0)}, "optimizer": {}, "rng": None, "step": 3, "losses": [1.0, 0.5],
         "config": {"lr": 1e-3}}


def test_an_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt.pt"
    checkpoint.save(STATE, path)
    before = path.read_bytes()

    def crash(obj, f):  # the process dies after writing half the bytes (a kill, a full disk)
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({**STATE, "step": 4}, path)
    assert path.read_bytes() == before and checkpoint.load(path)["step"] == 3


def test_rng_state_round_trips():
    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_unreadable_and_foreign_files_are_named(tmp_path):
    assert checkpoint.load(tmp_path / "none.pt") is None
    (tmp_path / "cut.pt").write_bytes(b"\x80\x04 cut short")
    with pytest.raises(checkpoint.CheckpointError, match="cut.pt: not a readable checkpoint"):
        checkpoint.load(tmp_path / "cut.pt")
    checkpoint.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="other.pt: not the file expected here"):
        checkpoint.load(tmp_path / "other.pt")
    assert checkpoint.load(tmp_path / "other.pt", keys=("model",)) == {"model": {}}


def test_config_changes_name_what_differs():
    saved = {"steps": 45, "lr": 1e-3, "old_key": 1}
    assert checkpoint.config_changes(saved, {"steps": 60, "lr": 1e-3}, ("steps", "lr", "new_key")) == ["steps 45 -> 60"]
