"""Ensembles of classifiers that average softmax probabilities (the paper's multi-model results, Table 5).

Used by training (N members) and the registry/evaluation (``ops/``); not run on its own::

    ensemble = Ensemble([model_a, model_b]).eval()
    probs = ensemble(images)                         # [N, C], mean of the members' softmax
    per_member = ensemble.member_probabilities(images)  # [M, N, C], one pass for every ensemble size
    probs_of_first_k = per_member[:k].mean(0)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class Ensemble(nn.Module):
    """Average of the members' softmax probabilities; members are any modules whose ``forward`` gives logits.

    Probabilities are computed in float32 even under bfloat16 autocast so that averages of many
    members stay exact to float32 precision. Members follow the ensemble's train/eval mode.
    """

    def __init__(self, members: Iterable[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("Ensemble needs at least one member model")
        for index, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise TypeError(f"Ensemble member {index} is a {type(member).__name__}, not an nn.Module")
        self.members = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.members)

    def member_probabilities(self, x: Tensor) -> Tensor:
        """Softmax probabilities of every member, stacked: [M, N, C] (float32)."""
        probabilities = []
        for index, member in enumerate(self.members):
            logits = member(x)
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                raise ValueError(
                    f"Ensemble member {index} must return logits [N, C], got "
                    f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
                )
            if probabilities and logits.shape != probabilities[0].shape:
                raise ValueError(
                    f"Ensemble member {index} returns {tuple(logits.shape)} but member 0 returns "
                    f"{tuple(probabilities[0].shape)}: members must share the number of classes"
                )
            probabilities.append(torch.softmax(logits.float(), dim=-1))
        return torch.stack(probabilities)

    def forward(self, x: Tensor) -> Tensor:
        """Mean of the members' softmax probabilities: [N, C] (float32)."""
        return self.member_probabilities(x).mean(dim=0)
