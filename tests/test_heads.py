"""The utterance head against its formula written out by hand: mean over the valid frames, then linear layers."""

from __future__ import annotations

import torch

from adaltm_downstream.common.heads import UtteranceClassifier, pad_features

DIM = 5


def utterances(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(lengths))
    return [torch.randn(n, DIM, generator=generator) * 3 + 7 for n in lengths]


def test_padding_does_not_change_an_utterances_logits():
    torch.manual_seed(0)
    head = UtteranceClassifier(DIM, 8, projector_dim=4, hidden_dim=3)
    features = utterances(6, 2)
    with torch.no_grad():
        together = head(*pad_features(features))
        alone = torch.cat([head(*pad_features([f])) for f in features])
        by_hand = head.classifier(head.projector(torch.stack([f.mean(dim=0) for f in features])))
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together, by_hand, atol=1e-5)

