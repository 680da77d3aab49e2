"""Intervals and paired differences against the `confidence-intervals` package itself (the toolkit the AdaLTM paper
cites), at utterance and speaker level; `adaltm compare` and `adaltm table` on run directories."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import confidence_intervals  # the oracle: a test dependency (pyproject's `test` extra, pinned in constraints.txt)
import numpy as np
import pytest
import yaml
from sklearn.metrics import f1_score, precision_score, recall_score

from adaltm_cli.main import main
from adaltm_downstream.common.corpus import CLASSES
from adaltm_downstream.common.emotion import EmotionSettings, EmotionTask
from adaltm_downstream.common.statistics import bootstrap_intervals, paired_differences

SKLEARN = {"uar": recall_score, "precision": precision_score, "macro_f1": f1_score}
RESAMPLES = 200  # the package calls scikit-learn once per resample: keep it quick


def metric(name):
    return lambda labels, predicted: SKLEARN[name](labels, predicted, average="macro", zero_division=0)


def difference(name):
    return lambda labels, a, b: metric(name)(labels, a) - metric(name)(labels, b)


def sample(seed: int, n: int = 60):
    """A small test set: a rare class only ever predicted (union vs reference classes matters), 9 speakers."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 4, 5, 6], size=n, p=[0.3, 0.1, 0.25, 0.25, 0.1])
    a = np.where(rng.random(n) < 0.5, labels, rng.integers(0, 8, n))
    b = np.where(rng.random(n) < 0.3, labels, rng.integers(0, 8, n))
    speakers = np.array([f"spk{int(s):02d}" for s in rng.integers(0, 9, n)])
    return labels, a, b, speakers


@pytest.mark.parametrize("unit", ["utterance", "speaker"])
def test_intervals_identical_to_the_package(unit):
    labels, predicted, _, speakers = sample(1)
    # the package wants integer conditions; sorted codes keep the speakers' order
    conditions = np.unique(speakers, return_inverse=True)[1] if unit == "speaker" else None
    ours = bootstrap_intervals(labels, predicted, 8, RESAMPLES, speakers if unit == "speaker" else None)
    for name in SKLEARN:
        center, (low, high) = confidence_intervals.evaluate_with_conf_int(
            predicted, metric(name), labels, conditions=conditions, num_bootstraps=RESAMPLES)
        assert ours[name] == pytest.approx([low, high], abs=1e-12), name


@pytest.mark.parametrize("unit", ["utterance", "speaker"])
def test_paired_difference_identical_to_the_package(unit):
    labels, a, b, speakers = sample(2)
    conditions = np.unique(speakers, return_inverse=True)[1] if unit == "speaker" else None
    ours = paired_differences(labels, a, b, 8, RESAMPLES, speakers if unit == "speaker" else None)
    for name in SKLEARN:
        center, (low, high) = confidence_intervals.evaluate_with_conf_int(
            a, difference(name), labels, conditions=conditions, num_bootstraps=RESAMPLES, samples2=b)
        assert ours[name].difference == pytest.approx(center, abs=1e-12)
        assert ours[name].interval == pytest.approx([low, high], abs=1e-12)
        assert ours[name].significant == (low > 0 or high < 0)


def write_run(expdir: Path, labels, predicted, speakers, test_set: str = "Test1", intervals: str = "utterance") -> Path:
    """A run directory as an evaluation leaves it, written by the emotion task itself."""
    expdir.mkdir(parents=True)
    task = EmotionTask(16, EmotionSettings(loss="cross_entropy", intervals=intervals), [])
    records = defaultdict(list)
    probabilities = np.full((len(labels), 8), 0.02)
    probabilities[np.arange(len(labels)), predicted] = 0.86
    records.update(probabilities=probabilities.tolist(), labels=list(labels), emotion_loss=[1.0] * len(labels),
                   targets=np.eye(8)[labels].tolist(), files=[f"utt_{i:03d}.wav" for i in range(len(labels))])
    speaker_of = dict(zip(records["files"], speakers))
    metrics = task.evaluate(records, test_set, speaker_of)
    (expdir / "test_metrics.json").write_text(json.dumps(metrics))
    task.write(expdir, "test", records, metrics, speaker_of)
    return expdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 8, 400)
    speakers = [f"spk{i % 25}" for i in range(400)]
    good = np.where(rng.random(400) < 0.7, labels, rng.integers(0, 8, 400))
    weak = np.where(rng.random(400) < 0.3, labels, rng.integers(0, 8, 400))
    return {"good": write_run(root / "good", labels, good, speakers),
            "near": write_run(root / "near", labels, np.where(np.arange(400) == 0, (good + 1) % 8, good), speakers),
            "weak": write_run(root / "weak", labels, weak, speakers, intervals="speaker"),
            "labels": labels, "good_pred": good, "weak_pred": weak, "speakers": speakers}


def test_evaluation_intervals_follow_the_configured_unit(runs):
    weak = json.loads((runs["weak"] / "test_metrics.json").read_text())
    assert weak["intervals"]["unit"] == "speaker"
    by_speaker = bootstrap_intervals(runs["labels"], runs["weak_pred"], 8, 1000, runs["speakers"])
    assert weak["ci95"]["uar"] == pytest.approx(by_speaker["uar"])
    assert weak["classes"] == list(CLASSES)


def test_compare_reports_the_paired_difference(runs, capsys):
    main(["compare", str(runs["good"]), str(runs["weak"]), "--json", "--resamples", "1000"])
    got = json.loads(capsys.readouterr().out)
    ours = paired_differences(runs["labels"], runs["good_pred"], runs["weak_pred"], 8, 1000)
    assert got["uar"]["interval"] == pytest.approx(ours["uar"].interval) and got["uar"]["significant"] is True
    main(["compare", str(runs["good"]), str(runs["near"]), "--by", "speaker"])
    text = capsys.readouterr().out
    assert "paired bootstrap over speakers" in text and "not significant" in text


def test_compare_refuses_different_test_sets(tmp_path, runs, capsys):
    other = write_run(tmp_path / "other", runs["labels"], runs["weak_pred"], runs["speakers"], test_set="Test2")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(runs["good"]), str(other)])
    assert exit_info.value.code == 2
    assert "scored on Test1" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".md", ".csv", ".tex"])
def test_table_marks_rows_that_differ_from_the_reference(tmp_path, runs, suffix, capsys):
    out = tmp_path / f"table{suffix}"
    main(["table", str(runs["good"]), str(runs["near"]), str(runs["weak"]), "-o", str(out),
          "--reference", str(runs["good"])])
    text = out.read_text()
    good = json.loads((runs["good"] / "test_metrics.json").read_text())
    if suffix == ".md":
        lines = text.splitlines()
        assert lines[0] == "| Method / setup | UAR | Precision | Macro-F1 |"
        lo, hi = good["ci95"]["uar"]
        assert f"| good (reference) | {100 * good['uar']:.2f} ± {100 * (hi - lo) / 2:.2f} |" in text
        near, weak = lines[3], lines[4]
        assert near.startswith("| near |") and "†" not in near
        assert weak.startswith("| weak |") and weak.count("†") == 3
    elif suffix == ".csv":
        header, _, near, weak = text.splitlines()
        assert header.split(",")[:5] == ["name", "uar", "uar_ci_low", "uar_ci_high", "uar_significant"]
        assert near.split(",")[4] == "no" and weak.split(",")[4] == "yes"
    else:
        assert text.startswith(r"\begin{tabular}{lccc}") and text.count(r"$^\dagger$") == 3


def test_table_tells_apart_runs_that_share_a_config(tmp_path, runs):
    """Two runs of one `-g` config with other `-o` values get the settings that differ in their row names."""
    config = tmp_path / "dual.yaml"
    config.write_text("base: /m/base.pt\ntask_vectors: {asr: /v/asr.safetensors, ser: /v/ser.safetensors}\n")
    rows = {}
    for lr, seed in ((1e-3, 0), (1e-4, 0), (1e-4, 1)):
        expdir = write_run(tmp_path / f"lr{lr}-{seed}", runs["labels"], runs["good_pred"], runs["speakers"])
        (expdir / "args_2026-12-06.yaml").write_text(yaml.safe_dump(
            {"upstream": "adaltm_wavlm", "upstream_model_config": str(config), "downstream": "msp_podcast_cat",
             "expdir": str(expdir), "seed": seed}))
        (expdir / "config_2026-12-06.yaml").write_text(yaml.safe_dump(
            {"optimizer": {"name": "AdamW", "lr": lr}, "runner": {"total_steps": 100}}))
        rows[(lr, seed)] = expdir
    twins = [write_run(tmp_path / parent / "run", runs["labels"], runs["weak_pred"], runs["speakers"])
             for parent in ("a", "b")]
    out = tmp_path / "table.md"
    main(["table", *map(str, rows.values()), *map(str, twins), "-o", str(out)])
    names = [line.split(" | ")[0][2:] for line in out.read_text().splitlines()[2:7]]
    shared = "asr+ser vectors, layerwise λ"
    assert names == [f"{shared} [optimizer.lr=0.001, seed=0]", f"{shared} [optimizer.lr=0.0001, seed=0]",
                     f"{shared} [optimizer.lr=0.0001, seed=1]", f"run [{twins[0]}]", f"run [{twins[1]}]"]
