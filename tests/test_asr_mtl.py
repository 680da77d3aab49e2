"""ASR and MTL downstreams, the differential-LR optimizer, and fine-tuned states as task-vector sources."""

from __future__ import annotations

import csv
import json

import jiwer
import pytest
import torch
from torch import nn

from adaltm_downstream.common.ctc import BLANK, Vocabulary, error_rates, normalize_text
from adaltm_s3prl.optimizers import get_DifferentialAdamW
from adaltm_upstream import task_vectors
from adaltm_upstream.checkpoints import load_checkpoint
from tests.conftest import ROOT, run_launcher, write_yaml


def test_normalisation_vocabulary_round_trip_and_greedy_ctc(tmp_path):
    assert normalize_text("  Hello, WORLD!  it's [laughter]\n") == "hello world it's laughter"
    vocabulary = Vocabulary.load_or_build(tmp_path / "vocab.json", ["Abc, cab!", "b a"])
    assert vocabulary.symbols == [BLANK, " ", "a", "b", "c"]
    assert vocabulary.decode(vocabulary.encode("ABC cab")) == "abc cab"
    assert Vocabulary.load_or_build(tmp_path / "vocab.json", ["zzz"]).symbols == vocabulary.symbols  # saved one wins
    a, b, c, space = 2, 3, 4, 1
    frames = [0, a, a, 0, a, b, b, 0, 0, space, c, 0, c, c, 0]
    assert vocabulary.greedy(frames) == "aab cc"


def test_error_rates_are_jiwers():
    refs, hyps = ["the cat sat", "hello there", ""], ["the bat sat down", "hello", "ignored"]
    rates = error_rates(refs, hyps)
    assert rates["wer"] == pytest.approx(jiwer.wer(refs[:2], hyps[:2]))
    assert rates["cer"] == pytest.approx(jiwer.cer(refs[:2], hyps[:2]))


class _Upstream(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = nn.Linear(2, 2)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
        self.merge = nn.Module()
        self.merge.coefficients = nn.Parameter(torch.ones(4, 2))
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def get_downsample_rates(self, key):
        return 320


def test_differential_optimizer_gives_each_group_its_rate():
    upstream, head = _Upstream(), nn.Linear(2, 3)
    optimizer = get_DifferentialAdamW([upstream, head], lr=1e-3, upstream_lr=1e-4, lambda_lr=5e-2,
                                      layer_decay=0.5, weight_decay=0.01, total_steps=10)
    rate_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert rate_of[id(head.weight)] == 1e-3 and decay_of[id(head.weight)] == 0.01
    assert rate_of[id(upstream.merge.coefficients)] == 5e-2 and decay_of[id(upstream.merge.coefficients)] == 0
    for layer in range(3):  # top layer (3 of 3): 1e-4; layer l: 1e-4 * 0.5^(3 - l)
        assert rate_of[id(upstream.encoder.layers[layer].weight)] == pytest.approx(1e-4 * 0.5 ** (2 - layer))
    assert rate_of[id(upstream.cnn.weight)] == pytest.approx(1e-4 * 0.5 ** 3)
    assert id(upstream.frozen) not in rate_of


@pytest.fixture(scope="module")
def corpus(mini_msp):
    return mini_msp[0]


SHORT = ("config.runner.total_steps=3,,config.runner.eval_step=3,,config.runner.save_step=3,,config.runner.log_step=1,,"
         "config.downstream_expert.datarc.num_workers=0,,config.downstream_expert.datarc.batch_seconds=6.0,,")


def test_asr_finetuning_changes_the_backbone_but_not_the_cnn(tmp_path, corpus, tiny_unilm):
    expdir = tmp_path / "asr"
    run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(tiny_unilm), "-f", "-d", "msp_podcast_asr",
                  "-c", "configs/downstream/asr_in_domain_finetune.yaml", "-p", str(expdir),
                  "-o", SHORT + f"config.downstream_expert.datarc.root={corpus},,config.optimizer.upstream_lr=1e-3"],
                 cwd=ROOT)
    rows = list(csv.DictReader(open(expdir / "dev_transcripts.tsv"), delimiter="\t"))
    metrics = json.loads((expdir / "dev_metrics.json").read_text())
    refs, hyps = [r["ref"] for r in rows], [r["hyp"] or "" for r in rows]
    assert metrics["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert metrics["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert metrics["test_set"] == "Development"
    assert json.loads((expdir / "vocab.json").read_text())["symbols"][0] == BLANK

    out = tmp_path / "asr.safetensors"
    tensors, meta = task_vectors.extract(tiny_unilm, expdir / "states-3.ckpt")
    task_vectors.save(out, tensors, meta)
    assert meta["finetuned_format"] == "s3prl-states"
    cnn = [k for k in tensors if k.startswith("feature_extractor.")]
    assert cnn and all(not tensors[k].any() for k in cnn)          # feature_grad_mult = 0: never trained
    report = task_vectors.inspect([task_vectors.load(out)])[0]
    assert report["groups"][1]["norm"] > 0 and report["groups"][2]["norm"] > 0


def test_mtl_static_init_trains_every_weight_and_writes_both_families(tmp_path, corpus, merge_setup):
    upstream = write_yaml(tmp_path / "mtl.yaml", {
        "base": str(merge_setup["base"]),
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])},
        "merge": {"granularity": "static", "init": 0.5, "train_merged_weights": True}})
    expdir = tmp_path / "mtl"
    run_launcher(["-m", "train", "-u", "adaltm_wavlm", "-g", str(upstream), "-d", "msp_podcast_mtl",
                  "-p", str(expdir), "-o", SHORT + f"config.downstream_expert.datarc.root={corpus},,"
                  "config.downstream_expert.datarc.batch_size=None,,config.optimizer.upstream_lr=1e-3"], cwd=ROOT)
    metrics = json.loads((expdir / "dev_metrics.json").read_text())
    assert {"uar", "precision", "macro_f1", "ci95", "wer", "cer", "emotion_loss", "asr_loss", "loss"} <= set(metrics)
    assert (expdir / "dev_predictions.tsv").exists() and (expdir / "dev_transcripts.tsv").exists()

    # the states hold the whole trained backbone, readable as a fine-tuned checkpoint
    trained = load_checkpoint(expdir / "states-3.ckpt")
    assert trained.format == "adaltm-states"
    from adaltm_upstream import adaltm_wavlm

    start = adaltm_wavlm(model_config=str(upstream)).merged_state()
    moved = [k for k in trained.state if not torch.equal(trained.state[k], start[k])]
    assert any(k.startswith("encoder.layers.1.") for k in moved)
