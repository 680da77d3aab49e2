"""Class-balanced soft cross-entropy (EMO-SUPERB's formulation, cited by AdaLTM) and plain cross-entropy.

N training utterances, β = (N−1)/N; effective number E_k = (1 − β^n_k)/(1 − β); w_k ∝ 1/E_k with Σ_k w_k = K.
n_k counts either the utterances whose soft label for class k exceeds 1/K (EMO-SUPERB, `class_weights: soft`) or
those whose consensus label is k (`class_weights: consensus`). Per utterance: −(Σ_k w_k y_k)·Σ_k y_k log p_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def effective_number_weights(counts: torch.Tensor, total: int) -> torch.Tensor:
    """w_k ∝ (1 − β)/(1 − β^n_k), β = (total − 1)/total, normalised to Σ w_k = K; a count of 0 counts as 1."""
    classes = counts.numel()
    beta = (total - 1) / total
    present = counts.clamp(min=1).double()
    effective = (1.0 - beta ** present) / (1.0 - beta) if beta < 1 else present
    weights = 1.0 / effective
    return (weights * classes / weights.sum()).float()


def class_balanced_weights(soft_labels: torch.Tensor) -> torch.Tensor:
    """EMO-SUPERB's weights: n_k = training utterances whose soft label for class k exceeds 1/K (N × K input)."""
    count, classes = soft_labels.shape
    return effective_number_weights((soft_labels > 1.0 / classes).sum(dim=0), count)


def consensus_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The same formula on consensus (hard) label counts: n_k = training utterances whose consensus is k, N = those
    with a consensus (the AdaLTM authors' protocol as a third-party copy of it describes it)."""
    return effective_number_weights(torch.bincount(labels, minlength=classes), labels.numel())


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
