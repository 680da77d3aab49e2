"""Label-free AdaMerging objective: entropy against hand values; the frozen head of a finished run against s3prl's
own Featurizer + the head, so λ trained on it sees exactly the run's predictor."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

from adaltm_downstream.common.entropy import FrozenHeadError, entropy_loss, load_frozen_head
from adaltm_downstream.common.heads import UtteranceClassifier, pad_features

LAYERS, DIM, RATE = 3, 6, 320


def test_entropy_of_hand_computed_distributions():
    assert float(entropy_loss(torch.zeros(1, 8))) == pytest.approx(math.log(8))
    # p = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(entropy_loss(torch.tensor([[0.0, math.log(3.0)]]))) == pytest.approx(expected)
    # mean over the batch; a confident prediction has (almost) none
    batch = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    assert float(entropy_loss(batch)) == pytest.approx(math.log(2) / 2, rel=1e-6)


class FakeUpstream(nn.Module):
    """Enough of an upstream for s3prl's Featurizer: fixed random hidden states at 320× downsampling."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def get_downsample_rates(self, key):
        return RATE

    def forward(self, wavs):
        frames = max(len(w) for w in wavs) // RATE
        return {"hidden_states": [torch.randn(len(wavs), frames, DIM, generator=self.generator)
                                  for _ in range(LAYERS)]}


def write_run_states(path, head, featurizer_weights, normalize=False, layer=None, hidden=0):
    downstream = {f"emotion.head.{k}": v for k, v in head.state_dict().items()}
    downstream["selection.best"] = torch.tensor(0.5)
    states = {"Downstream": downstream, "Step": 10, "Config": {},
              "Args": argparse.Namespace(upstream_feature_normalize=normalize, upstream_layer_selection=layer)}
    if featurizer_weights is not None:
        states["Featurizer"] = {"weights": featurizer_weights}
    torch.save(states, path)
    return path


@pytest.mark.parametrize("normalize, hidden", [(False, 0), (True, 5)])
def test_frozen_head_reproduces_the_runs_featurizer_and_head(tmp_path, normalize, hidden):
    from s3prl.upstream.interfaces import Featurizer

    torch.manual_seed(0)
    upstream = FakeUpstream()
    featurizer = Featurizer(upstream, upstream_device="cpu", normalize=normalize)
    with torch.no_grad():
        featurizer.weights.copy_(torch.tensor([0.3, -1.0, 2.0]))
    head = UtteranceClassifier(DIM, 8, projector_dim=4, hidden_dim=hidden)
    frozen = load_frozen_head(write_run_states(tmp_path / "dev-best.ckpt", head, featurizer.weights.detach(),
                                               normalize=normalize))

    wavs = [torch.zeros(RATE * 7), torch.zeros(RATE * 4)]
    hidden_states = upstream(wavs)
    with torch.no_grad():
        expected = head(*pad_features(featurizer(wavs, hidden_states)))
    lengths = [7, 4]
    stacks = [torch.stack([h[b, :n] for h in hidden_states["hidden_states"]], dim=1) for b, n in enumerate(lengths)]
    frozen.train()
    assert torch.allclose(frozen(stacks), expected, atol=1e-6)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_gradient_reaches_the_features_not_the_head(tmp_path):
    head = UtteranceClassifier(DIM, 8, projector_dim=4)
    frozen = load_frozen_head(write_run_states(tmp_path / "s.ckpt", head, torch.zeros(LAYERS)))
    stacks = [torch.randn(5, LAYERS, DIM, requires_grad=True)]
    entropy_loss(frozen(stacks)).backward()
    assert stacks[0].grad is not None and stacks[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())


def test_selected_layer_runs_use_that_layer(tmp_path):
    head = UtteranceClassifier(DIM, 8, projector_dim=4)
    frozen = load_frozen_head(write_run_states(tmp_path / "s.ckpt", head, None, layer=1))
    stack = torch.randn(5, LAYERS, DIM)
    with torch.no_grad():
        assert torch.equal(frozen([stack]), head(*pad_features([stack[:, 1]])))


def test_unusable_states_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "asr.ckpt"
    torch.save({"Downstream": {"ctc.weight": torch.zeros(2)}, "Args": argparse.Namespace()}, path)
    with pytest.raises(FrozenHeadError, match=rf"^{path}: the run has no emotion head"):
        load_frozen_head(path)
    head = UtteranceClassifier(DIM, 8, projector_dim=4)
    path = write_run_states(tmp_path / "nolayers.ckpt", head, None)
    with pytest.raises(FrozenHeadError, match="neither s3prl's layer weights"):
        load_frozen_head(path)
    frozen = load_frozen_head(write_run_states(tmp_path / "ok.ckpt", head, torch.zeros(LAYERS)))
    with pytest.raises(FrozenHeadError, match=r"trained on 3 hidden states of width 6, this upstream gives 4"):
        frozen([torch.randn(5, 4, DIM)])
