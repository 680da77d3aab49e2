"""The utterance head against its formula written out by hand: mean over the valid frames, then linear layers."""

from __future__ import annotations

import torch

from adaltm_downstream.common.heads import UtteranceClassifier, pad_features

DIM = 5


def utterances(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(lengths))
    return [torch.randn(n, DIM, generator=generator) * 3 + 7 for n in lengths]


def linear_part(head: UtteranceClassifier, pooled: torch.Tensor) -> torch.Tensor:
    return head.classifier(head.projector(pooled))


def test_padding_does_not_change_an_utterances_logits():
    torch.manual_seed(0)
    head = UtteranceClassifier(DIM, 8, projector_dim=4, hidden_dim=3)
    wavs = utterances(6, 2)
    with torch.no_grad():
        together = head(*pad_features(wavs))
        alone = torch.cat([head(*pad_features([w])) for w in wavs])
        by_hand = linear_part(head, torch.stack([w.mean(dim=0) for w in wavs]))
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together, by_hand, atol=1e-5)

