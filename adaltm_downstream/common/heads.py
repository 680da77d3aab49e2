"""Heads on top of s3prl's (weighted-sum) features, shared by the downstreams."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence


def pad_features(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """s3prl hands a list of (T_i, D) tensors; returns (B, T, D) and the valid-frame mask (B, T)."""
    lengths = torch.tensor([len(f) for f in features], device=features[0].device)
    padded = pad_sequence(features, batch_first=True)
    valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
    return padded, valid


class UtteranceClassifier(nn.Module):
    """The paper's SER head: projection, mean pooling over valid frames, classifier (optional hidden layer)."""

    def __init__(self, input_dim: int, classes: int, projector_dim: int = 256, hidden_dim: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.projector = nn.Linear(input_dim, projector_dim)
        layers: list[nn.Module] = []
        if hidden_dim:
            layers += [nn.Linear(projector_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden_dim or projector_dim, classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, padded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        projected = self.projector(padded) * valid[..., None]
        pooled = projected.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        return self.classifier(pooled)
