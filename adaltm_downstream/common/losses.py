"""Class-balanced soft cross-entropy (EMO-SUPERB's formulation, cited by AdaLTM) and plain cross-entropy.

N training utterances, β = (N−1)/N; n_k = utterances whose soft label for class k exceeds 1/K; effective number
E_k = (1 − β^n_k)/(1 − β); w_k ∝ 1/E_k with Σ_k w_k = K. Per utterance: −(Σ_k w_k y_k)·Σ_k y_k log p_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def class_balanced_weights(soft_labels: torch.Tensor) -> torch.Tensor:
    """Weights from the training set's soft labels (N × K)."""
    count, classes = soft_labels.shape
    beta = (count - 1) / count
    present = (soft_labels > 1.0 / classes).sum(dim=0).clamp(min=1).double()
    effective = (1.0 - beta ** present) / (1.0 - beta) if beta < 1 else present
    weights = 1.0 / effective
    return (weights * classes / weights.sum()).float()


class SoftCrossEntropy(nn.Module):
    """Per-utterance −(Σ w_k y_k)·Σ y_k log p_k; with `weights=None` the plain soft cross-entropy."""

    def __init__(self, weights: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weights", weights if weights is not None else torch.zeros(0))

    def per_utterance(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nll = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
        if self.weights.numel():
            nll = nll * (targets * self.weights).sum(dim=-1)
        return nll

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_utterance(logits, targets).mean()
