"""Resume without Ray: checkpoint round trip of the training state, RNG states that a load mapped
elsewhere (every resume on a GPU used to fail with "RNG state must be a torch.ByteTensor")."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import models
from ops.checkpoint import load_checkpoint, save_checkpoint
from orchestration.config import ScheduleConfig
from orchestration.ema import ModelEma
from orchestration.optim import RMSpropTF
from orchestration.resume import restore_training_state, rng_state, set_rng_state
from orchestration.schedule import LrSchedule


def _draws() -> tuple:
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


def _moved(state: dict) -> dict:
    """The state as a device-mapping load leaves it: tensors no longer CPU byte tensors."""
    out = dict(state, torch=state["torch"].to(torch.int16))
    if "cuda" in state:
        out["cuda"] = [t.cuda() for t in state["cuda"]]
    return out


def test_rng_state_restores_from_a_moved_copy():
    torch.manual_seed(3)
    saved = rng_state()
    expected = _draws()
    _draws()
    set_rng_state(_moved(saved))  # raised TypeError before: set_rng_state wants a CPU ByteTensor
    assert _draws() == expected


def _state(seed: int):
    torch.manual_seed(seed)
    model = models.inception_v3(num_classes=5, width_mult=0.25)
    opt = RMSpropTF(model.parameters(), lr=0.01)
    sched = LrSchedule(opt, 0.01, 10, ScheduleConfig(), 0.0)
    return model, opt, sched, ModelEma(model, 0.9)


def _step(model, opt, sched, ema, x):
    model.train()
    out = model(x, with_aux=True)
    loss = out.logits.logsumexp(1).mean() + out.aux_logits[0].logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    ema.update(model)
    return float(loss.detach())


def test_restore_training_state_continues_bit_exactly(tmp_path):
    x = torch.randn(2, 3, 75, 75)
    model, opt, sched, ema = _state(0)
    _step(model, opt, sched, ema, x)
    save_checkpoint(
        tmp_path,
        {
            "model_spec": {"name": "inception_v3", "num_classes": 5, "options": {"width_mult": 0.25}},
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": 1,
            "step": 1,
            "config": {},
            "class_names": list("abcde"),
            "extra": {"rng": [rng_state()], "ema_updates": ema.num_updates, "world_size": 1},
        },
    )
    expected = [_step(model, opt, sched, ema, x) for _ in range(2)]  # dropout draws from the RNG

    fresh = _state(1)
    payload = load_checkpoint(tmp_path)
    payload["extra"]["rng"] = [_moved(payload["extra"]["rng"][0])]
    assert restore_training_state(payload, *fresh, rank=0, world_size=1) == (1, 1)
    assert [_step(*fresh, x) for _ in range(2)] == expected
    assert torch.equal(fresh[3].module.fc.weight, ema.module.fc.weight)


def test_rng_states_of_another_world_size_are_reported(capsys):
    torch.manual_seed(5)
    before = torch.get_rng_state()
    from orchestration.resume import restore_rng_states

    restore_rng_states([rng_state(), rng_state()], rank=0, world_size=3)
    assert "RNG states of 2 worker(s) and this run has 3" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.gpu
def test_rng_state_mapped_to_cuda_restores():
    saved = rng_state()
    payload = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in saved.items()}
    expected = (_draws(), torch.rand(2, device="cuda").tolist())
    set_rng_state(_moved(payload))
    assert (_draws(), torch.rand(2, device="cuda").tolist()) == expected


def test_settings_the_workers_would_refuse_fail_in_the_driver(tmp_path):
    """Before: ``model.num_classes`` or ``data.global_batch`` mistakes failed only inside the Ray
    workers, retried ``checkpoint.max_failures`` times with a traceback each."""
    from orchestration.config import TrainConfig
    from orchestration.resume import DataCheckError, check_before_start
    from tests.pipeline.shard_fixtures import write_coded_shards

    write_coded_shards(tmp_path, {"train": 8}, num_classes=4, shard_size=8)

    def cfg(**sections):
        return TrainConfig.from_dict({"data": {"shards": str(tmp_path)}, **sections})

    check_before_start(cfg(model={"num_classes": 4}, scaling={"num_workers": 2}))
    with pytest.raises(DataCheckError, match="model.num_classes=7 but the shards in .* have 4 classes"):
        check_before_start(cfg(model={"num_classes": 7}))
    with pytest.raises(DataCheckError, match="data.global_batch=65 does not split over 2 workers"):
        check_before_start(
            cfg(data={"shards": str(tmp_path), "global_batch": 65}, scaling={"num_workers": 2})
        )
    with pytest.raises(DataCheckError, match="data.global_batch=64 does not split over 3 workers"):
        check_before_start(
            cfg(
                data={"shards": str(tmp_path), "global_batch": 64},
                scaling={"num_workers": 4, "min_workers": 3},
            )
        )
