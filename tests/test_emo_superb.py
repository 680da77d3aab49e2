"""EMO-SUPERB's protocol: its F1 against scikit-learn applied per batch as its expert does, its label files, the
packaged preset through the real launcher on an EMO-SUPERB-layout tree, and the corpus errors that name their fix."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import classification_report, f1_score

from adaltm_cli.main import main
from adaltm_core.settings import parse
from adaltm_downstream.common.corpus import CLASSES, CorpusError, CorpusSpec, load_corpus
from adaltm_downstream.common.data import DataSettings, UtteranceDataset, waveform_statistics
from adaltm_downstream.common.losses import consensus_weights
from adaltm_downstream.common.metrics import emo_superb_f1, emo_superb_f1_whole_set
from tests.conftest import ROOT, run_launcher, write_yaml
from tests.corpus_factory import tone

# EMO-SUPERB's data/PODCAST/Primary/config.json order, and the other columns of its label files.
PRIMARY = ["angry", "sad", "disgust", "contempt", "fear", "neutral", "surprise", "happy"]
SECONDARY = ["angry", "frustrated", "annoyed", "disappointed", "sad", "disgust", "depressed", "contempt", "confused",
             "concerned", "fear", "neutral", "surprise", "amused", "excited", "happy"]
CODE = dict(zip(PRIMARY, "ASDCFNUH"))
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")  # its zero_division


def sklearn_per_batch(files, soft, probabilities, batch_size):
    """EMO-SUPERB's expert.forward + log_records, with scikit-learn: sorted files, unshuffled batches, strict > 1/K
    on float32 tensors, classification_report(...)['macro avg']['f1-score'] per batch, mean over batches."""
    order = np.argsort(files, kind="stable")
    labels = torch.tensor(np.asarray(soft)[order], dtype=torch.float32)
    probs = torch.tensor(np.asarray(probabilities)[order], dtype=torch.float32)
    threshold = 1 / labels.shape[1]
    scores = []
    for start in range(0, len(order), batch_size):
        truth = torch.where(labels[start:start + batch_size] > threshold, 1.0, 0.0).numpy()
        guess = torch.where(probs[start:start + batch_size] > threshold, 1.0, 0.0).numpy()
        report = classification_report(truth, guess, target_names=PRIMARY, output_dict=True)
        scores.append(report["macro avg"]["f1-score"])
    return torch.FloatTensor(scores).mean().item()


@pytest.mark.parametrize("batch_size", [8, 32])
def test_emo_superb_f1_is_sklearn_per_sorted_batch(batch_size):
    rng = np.random.default_rng(batch_size)
    n = 90
    votes = rng.multinomial(5, [0.3, 0.1, 0.05, 0.05, 0.05, 0.25, 0.1, 0.1], size=n)
    soft = (votes + 0.02) / (votes + 0.02).sum(axis=1, keepdims=True)      # label-smoothed, as its CSVs are
    logits = rng.normal(size=(n, 8)) * 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    files = [f"MSP-PODCAST_{i:04d}.wav" for i in rng.permutation(n)]    # records arrive in our loader's order
    got = emo_superb_f1(files, soft, probabilities, batch_size)
    assert got == pytest.approx(sklearn_per_batch(files, soft, probabilities, batch_size), abs=1e-6)
    whole = f1_score(soft > 1 / 8, probabilities > 1 / 8, average="macro", zero_division=0)
    assert emo_superb_f1_whole_set(soft, probabilities) == pytest.approx(whole)
    assert got != pytest.approx(whole, abs=1e-3)  # the batch mean is a different number


def test_a_tie_at_exactly_one_over_k_is_negative():
    # Utterance 1: one vote of eight for anger (exactly 1/8) and the model gives anger exactly 1/8 too.
    soft = np.array([[0.125, 0, 0, 0, 0, 0.875, 0, 0], [0, 0, 0, 0, 0, 1.0, 0, 0]])
    probabilities = np.array([[0.125, 0, 0, 0, 0, 0.875, 0, 0], [0, 0, 0, 0, 0, 0.5, 0, 0.5]])
    # Strict >: class 0 is negative in both (absent: F1 0); neutral: tp 2 -> F1 1; happy: fp 1 -> F1 0.
    hand = (1.0 + 0.0) / 8
    assert emo_superb_f1(["a", "b"], soft, probabilities, 32) == pytest.approx(hand)
    # With >= (what we computed before) anger would count as a hit: (1 + 1) / 8.
    assert f1_score(soft >= 0.125, probabilities >= 0.125, average="macro", zero_division=0) == pytest.approx(2 / 8)


def test_consensus_weights_follow_the_effective_number_formula():
    labels = torch.tensor([0, 0, 0, 5, 5, 7])
    beta = 5 / 6
    raw = [(1 - beta) / (1 - beta ** max(n, 1)) for n in (3, 0, 0, 0, 0, 2, 0, 1)]
    expected = [8 * r / sum(raw) for r in raw]
    torch.testing.assert_close(consensus_weights(labels, 8), torch.tensor(expected, dtype=torch.float32))


def write_emo_superb_tree(root: Path, per_split: dict[str, int], header: list[str] = PRIMARY,
                          seconds: float = 0.6) -> dict:
    """EMO-SUPERB's PODCAST tree: Audios/ and Primary/labels_consensus_1.csv; no Transcripts/."""
    rng = np.random.default_rng(0)
    (root / "Audios").mkdir(parents=True)
    (root / "Primary").mkdir()
    rows, facts = [], {"soft": {}, "split": {}}
    for split, count in per_split.items():
        for i in range(count):
            name = f"MSP-PODCAST_{split[:4]}_{i:04d}.wav"
            votes = rng.multinomial(6, [0.3, 0.1, 0.05, 0.05, 0.05, 0.25, 0.1, 0.1][:len(header)]
                                    + [0.0] * (len(header) - 8))
            soft = np.round((votes + 0.1) / (votes + 0.1).sum(), 6)
            sf.write(root / "Audios" / name, tone(CODE.get(header[int(np.argmax(soft))], "N"), seconds, rng), 16000)
            rows.append([name, *[f"{v:.6f}" for v in soft], "3.0", "4.0", "4.0", f"{i % 3}", "Female", split])
            facts["soft"][name], facts["split"][name] = dict(zip(header, soft)), split
    with open(root / "Primary" / "labels_consensus_1.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["FileName", *header, "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"])
        writer.writerows(rows)
    return facts


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("emo_superb") / "PODCAST"
    return root, write_emo_superb_tree(root, {"Train": 12, "Development": 6, "Test": 6})


def test_label_file_read_as_given(tree):
    root, facts = tree
    spec = CorpusSpec(root, layout="emo_superb", labels_csv=root / "Primary" / "labels_consensus_1.csv")
    loaded = load_corpus(spec, ["Train", "Test"])
    utt = loaded["Test"][0]
    assert utt.soft == [pytest.approx(facts["soft"][utt.file][name]) for name in
                        ("angry", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise")]
    assert CLASSES[int(np.argmax(utt.soft))] == utt.consensus and utt.transcript is None and utt.speaker == "0"


def test_secondary_16_class_file_is_refused(tmp_path):
    root = tmp_path / "PODCAST"
    write_emo_superb_tree(root, {"Train": 2, "Development": 1, "Test": 1}, header=SECONDARY)
    spec = CorpusSpec(root, layout="emo_superb", labels_csv=root / "Primary" / "labels_consensus_1.csv")
    with pytest.raises(CorpusError, match="16 emotion columns.*Secondary.*only the 8 classes"):
        load_corpus(spec, ["Train"])


def test_corpus_errors_name_the_cause_and_the_key(tree):
    root, _ = tree
    base = {"root": str(root), "layout": "emo_superb", "labels_csv": "Primary/labels_consensus_1.csv"}
    settings = parse(DataSettings, base, "downstream_expert.datarc")  # default test split: Test1
    with pytest.raises(CorpusError) as missing:
        settings.load_splits()
    message = str(missing.value)
    assert "no Split_Set Test1 (present: Development, Test, Train)" in message
    assert "datarc.splits.test=Test" in message
    fixed = parse(DataSettings, {**base, "splits": {"train": "Train", "dev": "Development", "test": "Test"},
                                 "require_transcript": True}, "downstream_expert.datarc")
    with pytest.raises(CorpusError) as untranscribed:
        fixed.load_splits()
    assert "has a transcript" in str(untranscribed.value)
    assert "datarc.require_transcript=false" in str(untranscribed.value)


def test_first_ten_seconds_and_training_statistics(tmp_path, tree):
    root, _ = tree
    spec = CorpusSpec(root, layout="emo_superb", labels_csv=root / "Primary" / "labels_consensus_1.csv")
    train = load_corpus(spec, ["Train"])["Train"]
    samples = np.concatenate([sf.read(u.path, dtype="float32")[0].astype(np.float64) for u in train])
    mean, std = waveform_statistics(train, tmp_path / "stats.json")
    assert mean == pytest.approx(samples.mean(), abs=1e-9) and std == pytest.approx(samples.std(), rel=1e-7)
    assert waveform_statistics(train, tmp_path / "stats.json") == (mean, std)  # from the cache
    long = tmp_path / "long.wav"
    sf.write(long, np.linspace(-0.5, 0.5, 16000 * 12).astype(np.float32), 16000, subtype="FLOAT")
    train[0].path = long
    wav, _ = UtteranceDataset(train, lambda u: (u.file,), max_seconds=10.0, stats=(mean, std))[0]
    expected = (np.linspace(-0.5, 0.5, 16000 * 12).astype(np.float32)[:160000] - mean) / (std + 1e-6)
    np.testing.assert_allclose(wav, expected, atol=1e-4)


def test_preset_trains_and_evaluates_through_the_launcher(tmp_path, tree, merge_setup):
    root, facts = tree
    upstream = write_yaml(tmp_path / "dual.yaml", {
        "base": str(merge_setup["base"]),
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])}})
    expdir = tmp_path / "exp"
    quick = ("config.runner.total_steps=2,,config.runner.eval_step=2,,config.runner.save_step=2,,"
             "config.runner.log_step=1,,config.downstream_expert.datarc.batch_size=4,,"
             "config.downstream_expert.datarc.num_workers=0,,config.downstream_expert.emotion.emo_superb_eval_batch_size=4")
    run_launcher(["-m", "train", "-u", "adaltm_wavlm", "-g", str(upstream), "-d", "msp_podcast_cat",
                  "-c", str(ROOT / "configs" / "downstream" / "emo_superb.yaml"), "-p", str(expdir),
                  "-o", f"config.downstream_expert.datarc.root={root},,{quick}"], cwd=tmp_path)
    metrics = json.loads((expdir / "test_metrics.json").read_text())
    assert metrics["test_set"] == "Test" and metrics["n"] == 6 and metrics["emo_superb_eval_batch_size"] == 4
    with open(expdir / "test_predictions.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    files = [r["file"] for r in rows]
    probabilities = np.array([[float(r[f"p_{k}"]) for k in range(8)] for r in rows])
    soft = np.array([[facts["soft"][f][name] for name in
                      ("angry", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise")] for f in files])
    assert metrics["emo_superb_f1"] == pytest.approx(sklearn_per_batch(files, soft, probabilities, 4), abs=1e-6)
    assert {r["speaker"] for r in rows} <= {"0", "1", "2"}
    stats = json.loads((expdir / "train_waveform_stats.json").read_text())
    train = [np.asarray(sf.read(root / "Audios" / f, dtype="float32")[0], dtype=np.float64)
             for f, s in facts["split"].items() if s == "Train"]
    assert stats["mean"] == pytest.approx(np.concatenate(train).mean(), abs=1e-9) and stats["files"] == 12
    assert math.isfinite(metrics["loss"]) and (expdir / "dev-best.ckpt").exists()
    assert files == sorted(files)  # unbucketed evaluation in EMO-SUPERB's order
    table = tmp_path / "table.md"
    main(["table", str(expdir), "-o", str(table)])
    assert "| asr+ser vectors, layerwise λ | " in table.read_text()  # the row is named from the -g config
