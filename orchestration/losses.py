"""Label-smoothing cross-entropy (paper §7) and the main + auxiliary loss of the training step.

Imported by ``orchestration.loop``; tested against hand values in ``tests/orchestration/test_losses_ema.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def label_smoothing_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, epsilon: float = 0.1
) -> torch.Tensor:
    """Mean over the batch of ``H(q', p)`` with ``q'(k) = (1 - ε) δ(k, y) + ε / K`` (paper §7, u = uniform).

    logits [B, K] (any float dtype, computed in float32), target int64 [B].
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, K]
    nll = -logp.gather(1, target[:, None]).squeeze(1)  # [B]
    uniform = -logp.mean(dim=-1)  # [B] = sum_k (1/K) * -log p_k
    return ((1 - epsilon) * nll + epsilon * uniform).mean()


def training_loss(
    logits: torch.Tensor,
    aux_logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    aux_weights: Sequence[float],
    epsilon: float,
) -> torch.Tensor:
    """Main loss plus ``sum(w_i * loss(aux_i))``: Inception-v3 one head at 0.4, GoogLeNet two at 0.3
    (the weights come from ``model.aux_loss_weights``)."""
    if len(aux_logits) != len(aux_weights):
        raise ValueError(f"{len(aux_logits)} auxiliary outputs but {len(aux_weights)} aux loss weights")
    loss = label_smoothing_cross_entropy(logits, target, epsilon)
    for weight, aux in zip(aux_weights, aux_logits, strict=True):
        loss = loss + weight * label_smoothing_cross_entropy(aux, target, epsilon)
    return loss
