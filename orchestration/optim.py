"""RMSProp in the TensorFlow form the paper trained with, and the optimizer factory of the loop.

Imported by ``orchestration.loop`` / ``orchestration.state``; tested against hand-computed steps
in ``tests/orchestration/test_optim.py``.

TensorFlow's ``tf.train.RMSPropOptimizer`` (used by the paper via TF-slim) updates, per parameter::

    ms  <- decay * ms + (1 - decay) * g^2            ms initialised to ONES
    mom <- momentum * mom + lr * g / sqrt(ms + eps)  lr applied INSIDE the momentum buffer
    p   <- p - mom

``torch.optim.RMSprop(alpha=decay, eps=eps, momentum=momentum)`` instead does::

    ms  <- alpha * ms + (1 - alpha) * g^2            ms initialised to ZEROS
    buf <- momentum * buf + g / (sqrt(ms) + eps)     eps OUTSIDE the square root, no lr in the buffer
    p   <- p - lr * buf

The three differences matter with the paper's ε = 1.0: ``sqrt(ms + 1)`` vs ``sqrt(ms) + 1`` differ by
up to 2x for small ``ms``; zero-initialised ``ms`` makes torch's first steps ~3x larger
(``1/sqrt(0.1 g^2)``); and with lr in the buffer a learning-rate change affects only new gradients
(TF) instead of rescaling the whole accumulated momentum at once (torch). Same as timm's
``RMSpropTF`` (timm/optim/rmsprop_tf.py) with ``lr_in_momentum=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestration.config import OptimConfig


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as ``tf.train.RMSPropOptimizer`` (non-centred), see the module docstring.

    ``weight_decay`` is an L2 term added to the gradient before the update (as TF-slim's
    ``weights_regularizer`` adds ``wd * ||w||^2 / 2`` to the loss), so it also passes through the
    RMS normalisation — that is what the reference did.
    """

    def __init__(
        self,
        params,
        lr: float = 0.045,
        decay: float = 0.9,
        momentum: float = 0.9,
        eps: float = 1.0,
        weight_decay: float = 0.0,
        foreach: bool = True,
    ):
        if lr <= 0 or not 0 <= decay < 1 or not 0 <= momentum < 1 or eps <= 0 or weight_decay < 0:
            raise ValueError(
                f"RMSpropTF: invalid hyper-parameters lr={lr} decay={decay} "
                f"momentum={momentum} eps={eps} weight_decay={weight_decay}"
            )
        super().__init__(
            params,
            dict(lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=weight_decay, foreach=foreach),
        )

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["square_avg"] = torch.ones_like(p)  # TF: ms initialised to ones (torch: zeros)
            state["momentum_buffer"] = torch.zeros_like(p)
        state["step"] += 1
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("RMSpropTF does not support sparse gradients")
            if not params:
                continue
            same_kind = len({(p.device, p.dtype) for p in params}) == 1
            if group.get("foreach", True) and same_kind:
                self._update_foreach(group, params)
            else:
                for p in params:
                    self._update_one(group, p)
        return loss

    def _update_one(self, group: dict, p: torch.Tensor) -> None:
        """One tensor, the formulas of the module docstring (the reference of ``_update_foreach``)."""
        lr, decay, momentum = group["lr"], group["decay"], group["momentum"]
        eps, wd = group["eps"], group["weight_decay"]
        state = self._state_of(p)
        grad = p.grad.add(p, alpha=wd) if wd else p.grad
        square_avg = state["square_avg"]
        square_avg.mul_(decay).addcmul_(grad, grad, value=1 - decay)
        denom = square_avg.add(eps).sqrt_()  # TF: eps INSIDE the sqrt (torch: sqrt(ms) + eps)
        buf = state["momentum_buffer"]
        if momentum > 0:
            buf.mul_(momentum).addcdiv_(grad, denom, value=lr)  # TF: lr inside the buffer
            p.sub_(buf)
        else:
            p.addcdiv_(grad, denom, value=-lr)

    def _update_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        """The same arithmetic as ``_update_one`` on whole lists: ~8 multi-tensor kernels per group
        instead of ~8 kernels per tensor (Inception-v3: ~2,400 launches per step otherwise)."""
        lr, decay, momentum = group["lr"], group["decay"], group["momentum"]
        eps, wd = group["eps"], group["weight_decay"]
        states = [self._state_of(p) for p in params]
        grads = [p.grad for p in params]
        if wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        square_avgs = [st["square_avg"] for st in states]
        torch._foreach_mul_(square_avgs, decay)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - decay)
        denoms = torch._foreach_add(square_avgs, eps)
        torch._foreach_sqrt_(denoms)
        if momentum > 0:
            bufs = [st["momentum_buffer"] for st in states]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcdiv_(bufs, grads, denoms, value=lr)
            torch._foreach_sub_(params, bufs)
        else:
            torch._foreach_addcdiv_(params, grads, denoms, value=-lr)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: TF-slim puts ``weights_regularizer`` on conv2d and
    fully_connected weights, never on batch-norm parameters or biases."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def loss_weight_decay(cfg: OptimConfig) -> float:
    """The L2 coefficient the loop adds to the gradients before clipping (``in_loss``), else 0."""
    return cfg.weight_decay if cfg.weight_decay_placement == "in_loss" else 0.0


@torch.no_grad()
def add_weight_decay(params: list[torch.Tensor], weight_decay: float) -> None:
    """``g += wd * w`` on each of ``params`` (the gradient of ``wd/2 * ||w||^2``, TF-slim's
    ``weights_regularizer`` term of the loss); ``params`` as ``parameter_groups``' decayed group."""
    with_grad = [p for p in params if p.grad is not None]
    if weight_decay and with_grad:
        torch._foreach_add_([p.grad for p in with_grad], with_grad, alpha=weight_decay)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` at (already scaled) learning rate ``lr``. With
    ``weight_decay_placement: in_loss`` the loop adds the decay before clipping and the optimizer
    adds none; with ``after_clip`` the optimizer adds it to the (clipped) gradient."""
    groups = parameter_groups(model, 0.0 if cfg.weight_decay_placement == "in_loss" else cfg.weight_decay)
    if cfg.name == "rmsprop_tf":
        return RMSpropTF(groups, lr=lr, decay=cfg.decay, momentum=cfg.momentum, eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (rmsprop_tf | sgd)")


@torch.no_grad()
def clip_gradients(model: nn.Module, max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip the gradients at ``max_norm`` (paper §8: threshold 2.0; 0 = off) and return the global
    L2 norm before clipping as a 0-d tensor on the gradients' device. Reading it (``float``) waits for
    the GPU, so the loop reads it only when it logs (``train/grad_norm``).

    ``mode="global"``: one norm over all gradients, every gradient scaled by ``min(1, max_norm /
    norm)`` (``torch.nn.utils.clip_grad_norm_``). ``mode="per_tensor"``: each tensor's gradient on
    its own, ``g * max_norm / max(||g||, max_norm)``, as TF's ``clip_by_norm`` per variable in
    TF-slim's ``clip_gradient_norms`` (what ``create_train_op(clip_gradient_norm=...)`` applies).

    Both this and ``add_weight_decay`` run without autograd: ``g += wd * w`` with ``w`` requiring
    grad made every gradient part of a graph, which the per-tensor norms then extended each step
    (the process grew by ~13 MB a step and slowed down)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    if mode not in ("global", "per_tensor"):
        raise ValueError(f"clip mode must be global or per_tensor, got {mode!r}")
    if max_norm > 0 and mode == "global":  # in place by min(1, max_norm / norm), on the device: no sync
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    grads = [p.grad for p in params]
    if max_norm > 0:  # per tensor, on the device: no sync
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        scales = torch._foreach_div(torch._foreach_clamp_min(norms, max_norm), max_norm)
        torch._foreach_div_(grads, scales)  # g * max_norm / max(||g||, max_norm)
        return total
    return torch.nn.utils.get_total_norm(grads, foreach=True)
