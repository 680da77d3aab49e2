"""Metrics against scikit-learn, the loss against a hand computation, the sampler's guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from adaltm_downstream.common.losses import SoftCrossEntropy, class_balanced_weights
from adaltm_downstream.common.metrics import emotion_metrics
from adaltm_downstream.common.sampler import BucketBatchSampler


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_sklearn_with_missing_classes(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 4, 5, 7], size=300)          # classes 3 and 6 never in the reference
    logits = rng.normal(size=(300, 8))
    logits[:, 2] -= 10                                           # class 2 never predicted
    logits[labels == 5, 5] += 2                                  # some signal
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    predictions = probabilities.argmax(axis=1)
    assert {3, 6} <= set(predictions)                            # macro over reference ∪ predicted classes
    got = emotion_metrics(labels, probabilities)
    assert got["uar"] == pytest.approx(recall_score(labels, predictions, average="macro", zero_division=0))
    assert got["precision"] == pytest.approx(precision_score(labels, predictions, average="macro", zero_division=0))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert got["per_class_recall"][3] is None and got["per_class_recall"][2] == 0.0
    assert np.asarray(got["confusion"]).sum() == 300


def test_class_balanced_loss_matches_hand_computation():
    # 4 training utterances, K = 8; class 0 above 1/8 in 3 of them, class 1 in 2, the rest in none.
    soft = torch.zeros(4, 8)
    soft[0, 0] = 1.0
    soft[1, 0], soft[1, 1] = 0.5, 0.5
    soft[2, 0], soft[2, 1] = 0.5, 0.5
    soft[3, 2], soft[3, 0] = 0.9, 0.1    # 0.1 < 1/8: not counted for class 0
    weights = class_balanced_weights(soft)
    beta = 3 / 4
    effective = [(1 - beta ** n) / (1 - beta) for n in (3, 2, 1, 1, 1, 1, 1, 1)]  # n_k = 0 counts as 1
    raw = [1 / e for e in effective]
    expected = [8 * r / sum(raw) for r in raw]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))

    logits = torch.tensor([[2.0, 0.0, -1.0, 0, 0, 0, 0, 0], [0.0, 1.0, 0, 0, 0, 0, 0, 0]])
    targets = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0, 0, 0]])
    per = SoftCrossEntropy(weights).per_utterance(logits, targets)
    for i in range(2):
        log_p = [x - math.log(sum(math.exp(v) for v in logits[i].tolist())) for x in logits[i].tolist()]
        scale = sum(expected[k] * targets[i, k].item() for k in range(8))
        hand = -scale * sum(targets[i, k].item() * log_p[k] for k in range(8))
        assert per[i].item() == pytest.approx(hand, rel=1e-5)
    assert SoftCrossEntropy(weights)(logits, targets).item() == pytest.approx(per.mean().item())


def test_bucket_sampler_deterministic_ddp_aware_and_low_padding():
    rng = np.random.default_rng(0)
    seconds = list(np.clip(rng.gamma(2.0, 3.0, size=5000), 1.0, 30.0))   # MSP-like: mean ~6 s, long tail
    make = lambda rank=0, world=1: BucketBatchSampler(seconds, batch_size=32, seed=7, rank=rank,  # noqa: E731
                                                      world_size=world)
    assert list(make()) == list(make())
    shifted = make()
    shifted.set_epoch(1)
    assert list(shifted) != list(make())
    assert make().padded_fraction() <= 0.05
    ranks = [list(make(r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    seen = sorted(i for batches in ranks for batch in batches for i in batch)
    assert set(seen) == set(range(5000))
    by_seconds = BucketBatchSampler(seconds, batch_seconds=120.0, seed=7)
    for batch in by_seconds:
        assert len(batch) == 1 or max(seconds[i] for i in batch) * len(batch) <= 120.0
