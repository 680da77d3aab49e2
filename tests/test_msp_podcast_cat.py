"""msp_podcast_cat: the corpus reader on a generated release, its error report, and the real launcher."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from adaltm_core.safe_load import torch_load
from adaltm_core.settings import SettingsError, parse
from adaltm_downstream.common.corpus import CLASS_NAMES, CLASSES, CorpusError, CorpusSpec, load_corpus
from adaltm_downstream.common.data import DataSettings, UtteranceDataset, make_loader
from tests.conftest import run_launcher
from tests.corpus_factory import tone, write_mini_msp

SPLITS = ["Train", "Development", "Test1"]


@pytest.fixture(scope="module")
def corpus(mini_msp):
    return mini_msp


def test_splits_counts_soft_labels_and_transcript_filter(corpus):
    root, facts = corpus
    loaded = load_corpus(CorpusSpec(root), SPLITS)
    for split in SPLITS:
        assert [u.consensus for u in loaded[split]] == facts["rows"][split]
    utt = loaded["Train"][0]
    votes = facts["votes"][utt.file]
    assert utt.soft == [votes.count(c) / 3 for c in CLASSES] and utt.label == CLASSES.index(utt.consensus)
    other = next(u for u in loaded["Train"] if u.consensus == "O")
    assert other.label is None  # O and X are never evaluated
    filtered = load_corpus(CorpusSpec(root, require_transcript=True), SPLITS)
    assert all(u.transcript for s in SPLITS for u in filtered[s])
    kept = {u.file for s in SPLITS for u in filtered[s]}
    assert kept.isdisjoint(facts["no_transcript"]) and len(kept) == 44 - len(facts["no_transcript"])
    one_hot = load_corpus(CorpusSpec(root, soft_labels=False), ["Train"])["Train"][0]
    assert one_hot.soft is None and one_hot.target() == [float(c == one_hot.consensus) for c in CLASSES]


def test_44k_stereo_file_is_mixed_and_resampled(tmp_path):
    root = tmp_path / "MSP"
    write_mini_msp(root, {"Train": 4, "Development": 3, "Test1": 3})
    stereo = np.stack([tone("A", 1.0, np.random.default_rng(0), 44100)] * 2, axis=1)
    name = "MSP-PODCAST_Trai_0000.wav"
    sf.write(root / "Audios" / name, stereo, 44100)
    utterances = load_corpus(CorpusSpec(root), ["Train"])["Train"]
    dataset = UtteranceDataset(utterances, lambda u: (u.file,))
    wav, file = dataset[[u.file for u in utterances].index(name)]
    assert file == name and wav.ndim == 1 and abs(len(wav) - 16000) <= 1


def test_every_bad_input_is_reported_in_one_message(tmp_path):
    root = tmp_path / "MSP"
    write_mini_msp(root, {"Train": 6, "Development": 3, "Test1": 3})
    (root / "Audios" / "MSP-PODCAST_Trai_0000.wav").unlink()
    sf.write(root / "Audios" / "MSP-PODCAST_Trai_0001.wav", np.zeros(0, dtype=np.float32), 16000)
    (root / "Audios" / "MSP-PODCAST_Trai_0002.wav").write_bytes(b"RIFF garbage")
    path = root / "Labels" / "labels_consensus.csv"
    rows = list(csv.DictReader(open(path)))
    rows[3]["EmoClass"] = "Z"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(root / "Labels" / "labels_detailed.csv", "a") as handle:
        handle.write("MSP-PODCAST_Trai_0004.wav,w9,Bored,3,4,4\n")
    with pytest.raises(CorpusError) as info:
        load_corpus(CorpusSpec(root), SPLITS)
    message = str(info.value)
    assert "5 problem(s)" in message
    for expected in ("MSP-PODCAST_Trai_0000.wav: missing audio file", "MSP-PODCAST_Trai_0001.wav: empty audio",
                     "MSP-PODCAST_Trai_0002.wav: unreadable audio", "unknown EmoClass 'Z' for MSP-PODCAST_Trai_0003",
                     "unknown emotion 'Bored' for MSP-PODCAST_Trai_0004"):
        assert expected in message


@pytest.mark.parametrize("datarc, key", [
    ({}, "datarc.root: missing"),
    ({"root": "x", "batch_size": "32"}, "datarc.batch_size"),
    ({"root": "x", "layout": "csv"}, "datarc.layout"),
    ({"root": "x", "batch_seconds": 60.0}, "batch_size / batch_seconds"),
    ({"root": "x", "bogus": 1}, "unknown key(s) bogus"),
])
def test_datarc_errors_name_the_key(datarc, key):
    with pytest.raises(SettingsError, match=key.replace("(", r"\(").replace(")", r"\)")):
        parse(DataSettings, datarc, "downstream_expert.datarc")


def test_emo_superb_layout(tmp_path):
    root = tmp_path / "MSP"
    write_mini_msp(root, {"Train": 4, "Development": 3, "Test1": 3})
    names = ["angry", "sad", "disgust", "contempt", "fear", "neutral", "surprise", "happy", "other"]
    lines = ["FileName," + ",".join(names) + ",Split_Set"]
    lines.append("MSP-PODCAST_Trai_0000.wav,0.6,0,0,0,0,0.4,0,0,0,Train")
    lines.append("MSP-PODCAST_Deve_0000.wav,0,0,0,0,0,0,0,1.0,0,Development")
    (tmp_path / "labels_consensus_fold1.csv").write_text("\n".join(lines) + "\n")
    spec = CorpusSpec(root, layout="emo_superb", labels_csv=tmp_path / "labels_consensus_fold1.csv")
    loaded = load_corpus(spec, ["Train", "Development"])
    train = loaded["Train"][0]
    assert train.consensus == "A" and train.soft[CLASSES.index("N")] == pytest.approx(0.4)
    assert loaded["Development"][0].consensus == "H"


def test_launcher_trains_and_evaluates_with_stock_wavlm_local(tmp_path, corpus, tiny_unilm):
    root, facts = corpus
    expdir = tmp_path / "exp"
    override = (f"config.downstream_expert.datarc.root={root},,config.runner.total_steps=4,,"
                "config.runner.eval_step=2,,config.runner.save_step=2,,config.runner.log_step=2,,"
                "config.downstream_expert.datarc.batch_size=4,,config.downstream_expert.datarc.num_workers=0,,"
                "config.downstream_expert.datarc.require_transcript=false")
    train = run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(tiny_unilm), "-d", "msp_podcast_cat",
                          "-p", str(expdir), "-o", override], cwd=tmp_path)  # no -c: the packaged config
    assert "using the packaged config" in train.stderr and "[msp_podcast_cat] dev (Development) step 2" in train.stderr
    assert (expdir / "dev-best.ckpt").exists() and (expdir / "dev_metrics.json").exists()
    run_launcher(["-m", "evaluate", "-e", str(expdir / "dev-best.ckpt"), "-t", "test"], cwd=tmp_path)

    rows = (expdir / "test_predictions.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["file", "label", "pred"] + [f"p_{k}" for k in range(8)] + ["speaker"]
    evaluable = [c for c in facts["rows"]["Test1"] if c in CLASSES]
    assert len(rows) - 1 == len(evaluable)
    for row in rows[1:]:
        fields = row.split("\t")
        probabilities = [float(v) for v in fields[3:11]]
        assert int(fields[2]) == int(np.argmax(probabilities)) and sum(probabilities) == pytest.approx(1, abs=1e-4)
    metrics = json.loads((expdir / "test_metrics.json").read_text())
    assert metrics["test_set"] == "Test1" and metrics["classes"] == list(CLASSES) and metrics["n"] == len(evaluable)
    assert {"uar", "precision", "macro_f1", "accuracy", "loss", "ci95", "confusion", "emo_superb_f1",
            "emo_superb_f1_whole_set"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in ("uar", "precision", "macro_f1", "accuracy"))
    assert np.asarray(metrics["confusion"]).shape == (8, 8) and (expdir / "test_confusion.png").exists()

    stereo = tmp_path / "question.wav"  # -m inference reads any rate and channel count
    sf.write(stereo, np.stack([tone("H", 1.0, np.random.default_rng(1), 22050)] * 2, axis=1), 22050)
    run_launcher(["-m", "inference", "-e", str(expdir / "dev-best.ckpt"), "-t", str(stereo)], cwd=tmp_path)
    name, emotion, probabilities = (expdir / "inference.tsv").read_text().strip().split("\t")
    assert name == "question" and emotion in CLASS_NAMES and len(probabilities.split()) == 8


def test_data_loader_workers_are_capped_at_the_usable_cpus(corpus, monkeypatch, capsys):
    """A preset's `num_workers: 4` on a 2-CPU machine: 2 workers and one notice, not torch's warning."""
    root, _ = corpus
    utterances = load_corpus(CorpusSpec(root), ["Train"])["Train"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    settings = parse(DataSettings, {"root": str(root), "num_workers": 4}, "downstream_expert.datarc")
    loader = make_loader(utterances, lambda u: (u.label,), settings, train=True, name="train")
    assert loader.num_workers == 2
    assert "datarc.num_workers 4 capped at the 2 usable CPUs" in capsys.readouterr().err
    settings = parse(DataSettings, {"root": str(root), "num_workers": 1}, "downstream_expert.datarc")
    assert make_loader(utterances, lambda u: (u.label,), settings, train=False, name="dev").num_workers == 1
    assert "capped" not in capsys.readouterr().err


def test_a_run_resumed_mid_epoch_ends_where_an_uninterrupted_one_ends(tmp_path, corpus, tiny_unilm):
    """What a run killed after its step-4 checkpoint leaves is that checkpoint: resumed from it (elsewhere, -p),
    the run reaches step 6 with the same weights, bit for bit, as the run that went on. Mid-epoch (11 batches an
    epoch), with head dropout, random crops, a data-loader worker and an evaluation in between."""
    root, _ = corpus
    override = (f"config.downstream_expert.datarc.root={root},,config.runner.total_steps=6,,"
                "config.runner.eval_step=3,,config.runner.save_step=2,,config.runner.log_step=2,,"
                "config.runner.max_keep=10,,config.downstream_expert.datarc.batch_size=2,,"
                "config.downstream_expert.datarc.num_workers=1,,config.downstream_expert.datarc.crop_seconds=0.5,,"
                "config.downstream_expert.datarc.require_transcript=false,,"
                "config.downstream_expert.emotion.hidden_dim=8,,config.downstream_expert.emotion.dropout=0.5")
    went_on, resumed = tmp_path / "went_on", tmp_path / "resumed"
    run_launcher(["-m", "train", "-u", "wavlm_local", "-k", str(tiny_unilm), "-d", "msp_podcast_cat",
                  "-p", str(went_on), "-o", override], cwd=tmp_path)
    result = run_launcher(["-m", "train", "-e", str(went_on / "states-4.ckpt"), "-p", str(resumed)], cwd=tmp_path)
    a, b = (torch_load(run / "states-6.ckpt") for run in (went_on, resumed))
    assert a["Step"] == b["Step"] == 6 and a["Epoch"] == b["Epoch"] == 0
    for entry in ("Downstream", "Featurizer"):
        tensors = [k for k, v in a[entry].items() if isinstance(v, torch.Tensor)]
        assert tensors and all(torch.equal(a[entry][k], b[entry][k]) for k in tensors), entry
    assert "resuming after its batch 4" in result.stderr
    assert a["Downstream"]["_extra_state"]["training_position"]["consumed"] == 6
