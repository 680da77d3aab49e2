"""HarmoniFuse's layer fusion, in two variants (`downstream_expert.fusion.variant`).

`paper` follows the published description (Si et al., arXiv 2509.18570; read through its public summaries): the
gated speech encoder is a learnable softmax-weighted sum over all WavLM layers, one weight set per task, trained end
to end; the prompt selects the task (and so its weights) and the fusion depends on nothing else.

`extended` is this project's reading from before the paper body could be read, kept as a documented extension
(no source describes its two additions):
- prompt-adaptive dynamic fusion: per task, weights over all upstream layers computed from a learned task
  embedding (the "prompt") and, optionally, from the utterance itself, replacing one static weighted sum;
- gated speech encoder: task-conditioned sigmoid gates that keep, per frame and feature, the components of the
  fused representation that the task needs ("component-selective").
"""

from __future__ import annotations

import torch
from torch import nn


class TaskLayerWeights(nn.Module):
    """`paper`: fused_t = Σ_l softmax(w_t)_l h_l with a learnable logit w_{t,l} per task and layer (all zero at the
    start: the plain mean, as s3prl's featurizer starts). A table of `max_layers` columns, of which the first L are
    used, so the module does not need to know the upstream's depth in advance."""

    def __init__(self, tasks: list[str], max_layers: int = 64):
        super().__init__()
        self.tasks = list(tasks)
        self.logits = nn.Parameter(torch.zeros(len(tasks), max_layers))

    def weights(self, task: str, stacked: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L) layer weights for `stacked` (B, T, L, D): the task's, the same for every utterance."""
        layers = stacked.shape[2]
        if layers > self.logits.shape[1]:
            raise ValueError(f"upstream has {layers} layers, fusion.max_layers is {self.logits.shape[1]}")
        weights = torch.softmax(self.logits[self.tasks.index(task), :layers], dim=-1)
        return weights.expand(stacked.shape[0], -1)

    def forward(self, task: str, stacked: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.weights(task, stacked, valid)
        return torch.einsum("btld,bl->btd", stacked, weights), weights


class PromptAdaptiveFusion(nn.Module):
    """logit_{t,l} = vᵀ tanh(W_p p_t + e_l + W_u u_l), weights = softmax over layers, fused_t = Σ_l w_{t,l} h_l.
    p_t: task t's learned embedding (the prompt); e_l: a learned embedding of layer l (a table of `max_layers`
    rows, so the module does not need to know the upstream's depth in advance); u_l: the utterance's mean of
    layer l (only when utterance-conditioned)."""

    def __init__(self, tasks: list[str], dim: int, prompt_dim: int = 64, utterance_conditioned: bool = True,
                 max_layers: int = 64):
        super().__init__()
        self.tasks = list(tasks)
        self.prompts = nn.Parameter(torch.randn(len(tasks), prompt_dim) * 0.5)
        self.prompt_proj = nn.Linear(prompt_dim, prompt_dim)
        self.layer_embedding = nn.Parameter(torch.randn(max_layers, prompt_dim) * 0.5)
        self.utterance_proj = nn.Linear(dim, prompt_dim, bias=False) if utterance_conditioned else None
        self.score = nn.Linear(prompt_dim, 1, bias=False)

    def prompt(self, task: str) -> torch.Tensor:
        return self.prompts[self.tasks.index(task)]

    def weights(self, task: str, stacked: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L) layer weights for `stacked` (B, T, L, D)."""
        layers = stacked.shape[2]
        if layers > self.layer_embedding.shape[0]:
            raise ValueError(f"upstream has {layers} layers, fusion.max_layers is {self.layer_embedding.shape[0]}")
        query = self.prompt_proj(self.prompt(task)) + self.layer_embedding[:layers]          # (L, P)
        if self.utterance_proj is not None:
            mask = valid[:, :, None, None].to(stacked.dtype)
            pooled = (stacked * mask).sum(1) / mask.sum(1).clamp(min=1)                      # (B, L, D)
            hidden = torch.tanh(query + self.utterance_proj(pooled))                         # (B, L, P)
        else:
            hidden = torch.tanh(query).expand(stacked.shape[0], -1, -1)
        return torch.softmax(self.score(hidden).squeeze(-1), dim=-1)

    def forward(self, task: str, stacked: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.weights(task, stacked, valid)
        return torch.einsum("btld,bl->btd", stacked, weights), weights


class TaskGate(nn.Module):
    """gate_t = σ(W [h ; p_t] + b) per frame and feature; output = gate_t ⊙ h."""

    def __init__(self, dim: int, prompt_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim + prompt_dim, dim)

    def forward(self, fused: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conditioned = torch.cat([fused, prompt.expand(*fused.shape[:-1], -1)], dim=-1)
        gate = torch.sigmoid(self.linear(conditioned))
        return gate * fused, gate
