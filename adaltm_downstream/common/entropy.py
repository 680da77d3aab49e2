"""Label-free AdaMerging's objective: the prediction entropy of a frozen, already trained emotion head.

AdaMerging (Yang et al., ICLR 2024; FusionBench `method/adamerging`) trains the merge coefficients λ on
unlabeled target-domain batches by minimising the mean Shannon entropy of the predicted class distribution. Here the
predictor is the one a finished `msp_podcast_cat` (or `msp_podcast_mtl`) run selected: its `dev-best.ckpt` holds
s3prl's layer weights (`Featurizer.weights`, softmax-normalised) and the head (`Downstream`, `emotion.head.*`).
Both are kept frozen, so only λ moves. Input is what `LayerStack` hands a downstream that fuses layers itself:
one (frames, layers, dim) tensor per utterance, since s3prl's own featurizer would be trainable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaltm_core.errors import UserError
from adaltm_core.safe_load import torch_load
from adaltm_downstream.common.emotion import head_from_states
from adaltm_downstream.common.heads import UtteranceClassifier, pad_features


class FrozenHeadError(UserError):
    """The states file cannot provide a frozen emotion head; names the file and what is missing."""


def entropies(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) = −Σ_c p_c log p_c per row, in nats. Computed from log-softmax, so exact where
    FusionBench adds 1e-8 inside the log."""
    log_p = logits.float().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """AdaMerging's objective: the mean over the batch of the prediction entropy."""
    return entropies(logits).mean()


class FrozenEmotionHead(nn.Module):
    """A trained run's layer weighting + head as a fixed function from every hidden state to class logits."""

    def __init__(self, layer_weights: torch.Tensor | None, layer: int | None, normalize: bool,
                 head: UtteranceClassifier, source: str = "<head>"):
        super().__init__()
        self.layer, self.normalize, self.source = layer, normalize, source
        self.register_buffer("layer_weights", None if layer_weights is None else layer_weights.float().clone())
        self.head = head.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenEmotionHead:
        super().train(mode)
        self.head.eval()  # frozen means no dropout either
        return self

    def features(self, stacked: torch.Tensor) -> torch.Tensor:
        """(frames, layers, dim) -> (frames, dim) as the run's s3prl featurizer made them."""
        expected = None if self.layer_weights is None else len(self.layer_weights)
        if (expected and stacked.shape[1] != expected) or stacked.shape[-1] != self.head.projector.in_features:
            raise FrozenHeadError(f"{self.source}: the head was trained on {expected or 'some'} hidden states of "
                                  f"width {self.head.projector.in_features}, this upstream gives "
                                  f"{stacked.shape[1]} of width {stacked.shape[-1]} (same base and hidden_states?)")
        if self.layer is not None:
            return stacked[:, self.layer]
        if self.normalize:
            stacked = F.layer_norm(stacked, (stacked.shape[-1],))
        return torch.einsum("l,tld->td", self.layer_weights.softmax(dim=-1), stacked)

    def forward(self, layer_stacks: list[torch.Tensor]) -> torch.Tensor:
        return self.head(*pad_features([self.features(s) for s in layer_stacks]))


def load_frozen_head(path: str | os.PathLike) -> FrozenEmotionHead:
    """The emotion head of a finished run (`EXPDIR/dev-best.ckpt` or `states-N.ckpt`), frozen."""
    path = Path(path)
    states = torch_load(path)
    downstream = states.get("Downstream") if isinstance(states, dict) else None
    if not isinstance(downstream, dict):
        raise FrozenHeadError(f"{path}: not s3prl run states (no `Downstream` entry)")
    head = head_from_states(downstream, str(path), FrozenHeadError)

    args = states.get("Args")
    layer = getattr(args, "upstream_layer_selection", None)
    weights = (states.get("Featurizer") or {}).get("weights")
    if layer is None and weights is None:
        raise FrozenHeadError(f"{path}: neither s3prl's layer weights (`Featurizer.weights`) nor a selected layer "
                              "(`Args.upstream_layer_selection`): the head's input cannot be rebuilt")
    return FrozenEmotionHead(None if layer is not None else weights, layer,
                             bool(getattr(args, "upstream_feature_normalize", False)), head, str(path))
