"""HarmoniFuse: per-task fusion and gates, the interleaving schedule, and the real launcher."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from adaltm_downstream.common.interleave import InterleavedLoader
from adaltm_downstream.harmonifuse.expert import asr_fields, ser_fields
from adaltm_downstream.harmonifuse.model import PromptAdaptiveFusion, TaskGate, TaskLayerWeights
from tests.conftest import ROOT, run_launcher, write_yaml


def test_fusion_weights_differ_per_task_and_move_with_training():
    torch.manual_seed(0)
    fusion = PromptAdaptiveFusion(["ser", "asr"], dim=8, prompt_dim=16)
    stacked, valid = torch.randn(3, 20, 5, 8), torch.ones(3, 20, dtype=torch.bool)
    ser, asr = fusion.weights("ser", stacked, valid), fusion.weights("asr", stacked, valid)
    assert ser.shape == (3, 5) and torch.allclose(ser.sum(-1), torch.ones(3))
    assert (ser - asr).abs().max() > 1e-3
    before = ser.detach().clone()
    optimizer = torch.optim.Adam(fusion.parameters(), lr=0.05)
    for _ in range(20):  # teach SER to prefer the last layer
        loss = -torch.log(fusion.weights("ser", stacked, valid)[:, -1]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fusion.weights("ser", stacked, valid).detach()
    assert after[:, -1].mean() > before[:, -1].mean() + 0.1


def test_paper_fusion_is_a_per_task_softmax_weighted_sum_independent_of_the_utterance():
    torch.manual_seed(0)
    fusion = TaskLayerWeights(["ser", "asr"], max_layers=8)
    stacked, valid = torch.randn(2, 6, 4, 3), torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        fusion.logits.copy_(torch.randn(2, 8))
    fused, weights = fusion("asr", stacked, valid)
    expected_weights = torch.exp(fusion.logits[1, :4]) / torch.exp(fusion.logits[1, :4]).sum()   # by hand
    expected = sum(expected_weights[layer] * stacked[:, :, layer] for layer in range(4))
    torch.testing.assert_close(weights, expected_weights.expand(2, -1))
    torch.testing.assert_close(fused, expected)
    other = fusion.weights("asr", torch.randn(5, 9, 4, 3), torch.ones(5, 9, dtype=torch.bool))
    torch.testing.assert_close(other[0], weights[0])                 # no utterance term: same for any input
    assert (fusion.weights("ser", stacked, valid) - weights).abs().max() > 1e-3
    fresh = TaskLayerWeights(["ser", "asr"]).weights("ser", stacked, valid)
    torch.testing.assert_close(fresh, torch.full((2, 4), 0.25))      # starts as the plain mean
    with pytest.raises(ValueError, match="max_layers"):
        fusion.weights("ser", torch.randn(1, 2, 9, 3), torch.ones(1, 2, dtype=torch.bool))


def test_gates_are_in_unit_interval_and_task_specific():
    torch.manual_seed(0)
    fusion = PromptAdaptiveFusion(["ser", "asr"], dim=8, prompt_dim=16)
    gates = {t: TaskGate(8, 16) for t in ("ser", "asr")}
    fused = torch.randn(2, 10, 8)
    outputs = {t: gates[t](fused, fusion.prompt(t)) for t in gates}
    for gated, gate in outputs.values():
        assert ((gate > 0) & (gate < 1)).all()
        torch.testing.assert_close(gated, gate * fused)
    assert (outputs["ser"][1] - outputs["asr"][1]).abs().max() > 1e-3


def test_schedule_ratio_and_batches_carry_only_their_own_labels():
    from adaltm_downstream.common.corpus import Utterance
    from tests.corpus_factory import WORDS  # noqa: F401  (the factory's vocabulary, for realism only)

    utt = Utterance("f.wav", None, "Train", "s", "A", None, transcript="go stop")
    ser_batch, asr_batch = ser_fields(utt), asr_fields(utt)
    assert ser_batch[0] == "ser" and ser_batch[-1] is None           # no transcript in an SER batch
    assert asr_batch[0] == "asr" and asr_batch[1] is None and asr_batch[2] is None  # no emotion label in ASR

    sources = {"ser": lambda epoch: [("ser", i) for i in range(12)],
               "asr": lambda epoch: [("asr", i) for i in range(5)]}
    loader = InterleavedLoader(sources, ["ser", "ser", "asr"])
    batches = list(loader)
    assert len(batches) == len(loader) == 18
    counts = Counter(tag for tag, _ in batches)
    assert counts == {"ser": 12, "asr": 6}                            # 2:1, the ASR source restarted once
    assert [tag for tag, _ in batches[:6]] == ["ser", "ser", "asr"] * 2


@pytest.fixture(scope="module")
def corpus(mini_msp):
    return mini_msp[0]


SHORT = ("config.runner.total_steps=4,,config.runner.eval_step=4,,config.runner.save_step=4,,config.runner.log_step=2,,"
         "config.downstream_expert.ser_data.num_workers=0,,config.downstream_expert.asr_data.num_workers=0,,"
         "config.downstream_expert.ser_data.batch_size=4,,config.downstream_expert.asr_data.batch_size=4,,")


@pytest.mark.parametrize("upstream, variant", [("wavlm_local", "paper"), ("adaltm_wavlm", "extended")])
def test_launcher_trains_and_writes_both_metric_families(tmp_path, corpus, tiny_unilm, merge_setup, upstream,
                                                          variant):
    expdir = tmp_path / "hf"
    if upstream == "wavlm_local":
        choice = ["-u", "wavlm_local", "-k", str(tiny_unilm)]
    else:
        choice = ["-u", "adaltm_wavlm", "-g", str(write_yaml(tmp_path / "dual.yaml", {
            "base": str(merge_setup["base"]),
            "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])}}))]
    roots = (f"config.downstream_expert.ser_data.root={corpus},,config.downstream_expert.asr_data.root={corpus},,"
             f"config.downstream_expert.fusion.variant={variant}")
    result = run_launcher(["-m", "train", *choice, "-d", "harmonifuse", "-p", str(expdir), "-o", SHORT + roots],
                          cwd=ROOT)
    assert "[harmonifuse] dev (Development) step 4" in result.stderr
    metrics = json.loads((expdir / "dev_metrics.json").read_text())
    assert {"uar", "precision", "macro_f1", "ci95", "wer", "cer", "layer_weights"} <= set(metrics)
    weights = metrics["layer_weights"]
    assert len(weights["ser"]) == 3 and weights["ser"] != weights["asr"]
    if variant == "extended":
        assert all(0 < metrics["gate_mean"][t] < 1 for t in ("ser", "asr"))
    else:
        assert "gate_mean" not in metrics                            # the paper's variant has no gates
    assert (expdir / "dev_predictions.tsv").exists() and (expdir / "dev_transcripts.tsv").exists()
    run_launcher(["-m", "evaluate", "-e", str(expdir / "states-4.ckpt"), "-t", "test"], cwd=ROOT)
    assert json.loads((expdir / "test_metrics.json").read_text())["test_set"] == "Test1"
