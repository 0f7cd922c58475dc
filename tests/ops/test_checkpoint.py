"""The one checkpoint format is plain data read with ``weights_only=True``: a crafted file cannot run
code through any loader of it (evaluation ``--model DIR``, registry, resume)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from ops.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from orchestration.resume import rng_state, set_rng_state


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what an attacker's checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(**extra):
    return {
        "model_spec": {"name": "inception_v3", "num_classes": 3, "options": {}},
        "model": {"w": torch.ones(2)},
        "ema": {"w": torch.ones(2)},
        "optimizer": {},
        "scheduler": {},
        "epoch": 1,
        "step": 4,
        "config": {"data": {"crop_area": (0.08, 1.0)}},
        "class_names": ["a", "b", "c"],
        "extra": {"rng": [rng_state()], **extra},
    }


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(dict(_payload(), format_version=1, metrics=_Payload(str(marker))), folder / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors"):
        load_checkpoint(folder)
    assert not marker.exists()  # the payload did not run (it did with weights_only=False)
    with open(folder / "checkpoint.pt", "wb") as fh:  # not even torch's zip format: a bare pickle
        pickle.dump(_Payload(str(marker)), fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    assert not marker.exists()


def test_checkpoints_we_write_round_trip_with_rng_states(tmp_path):
    np.random.seed(7)
    random.seed(7)
    save_checkpoint(tmp_path, _payload())
    expected = (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist())
    payload = load_checkpoint(tmp_path)  # weights_only=True
    assert payload["config"] == {"data": {"crop_area": (0.08, 1.0)}} and payload["step"] == 4
    set_rng_state(payload["extra"]["rng"][0])
    assert (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist()) == expected


def test_the_refusal_does_not_pass_on_the_advice_to_load_without_weights_only(tmp_path):
    """Before: the message quoted PyTorch's first line, "Re-running `torch.load` with `weights_only`
    set to `False` will likely succeed": the one thing a user handed a hostile file must not do."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(
        dict(_payload(), format_version=1, metrics=_Payload(str(tmp_path / "x"))), folder / "checkpoint.pt"
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert "weights_only" not in message and "Re-run" not in message and "safe_globals" not in message
    assert "(the file asks to call io.open)" in message and message.endswith("do not load it")


def test_the_checkpoint_scan_names_what_it_skips(tmp_path, capsys):
    """Before: a hostile (or half-copied) checkpoint met by the resume scan was skipped in silence."""
    from orchestration.config import TrainConfig
    from orchestration.resume import newest_local_checkpoint

    cfg = TrainConfig.from_dict({"checkpoint": {"storage_path": str(tmp_path), "name": "run"}})
    good, bad = tmp_path / "run" / "checkpoint_2026-01-01", tmp_path / "run" / "checkpoint_2026-01-02"
    save_checkpoint(good, _payload())
    bad.mkdir()
    torch.save(
        dict(_payload(), format_version=1, metrics=_Payload(str(tmp_path / "x"))), bad / "checkpoint.pt"
    )
    assert newest_local_checkpoint(cfg, newer_than_step=0) == good
    assert f"warning: skipped {bad} while looking for the newest checkpoint" in capsys.readouterr().out
