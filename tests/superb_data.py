"""Tiny corpora in the layouts s3prl's stock SUPERB downstreams read, and configs for them.

Layouts and config keys follow s3prl 0.4.18's readers (facts read in s3prl/s3prl @ec8064b5, written anew here):
emotion/dataset.py + IEMOCAP_preprocess.py (meta_data/Session<N>/{train,test}_meta_data.json with `labels` and
`meta_data` [{path, label, speaker}]), asr/dataset.py + preprocess/generate_len_for_bucket.py (LibriSpeech
folders, `<spk>-<chapter>.trans.txt`, bucket CSVs `,file_path,length,label`), voxceleb1/dataset.py (`<root>/*/wav/<id>/
<video>/<n>.wav` and a split list `<1|2|3> <id>/<video>/<n>.wav`), fluent_commands/expert.py (`data/
{train,valid,test}_data.csv` with path, action, object, location).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000


def _tone(path: Path, rng: np.random.Generator, label: int, seconds: float = 0.5) -> None:
    """Audio whose pitch depends on the label, so a few steps can learn something."""
    t = np.arange(int(seconds * RATE)) / RATE
    wav = 0.3 * np.sin(2 * np.pi * (180 + 90 * label) * t) + 0.02 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav.astype(np.float32), RATE, subtype="PCM_16")


def runner_section(steps: int, eval_splits: list[str]) -> dict:
    return {"total_steps": steps, "gradient_clipping": 1, "gradient_accumulate_steps": 1, "log_step": steps,
            "eval_step": steps, "save_step": steps, "max_keep": 1, "eval_dataloaders": eval_splits}


def _config(steps: int, eval_splits: list[str], datarc: dict, modelrc: dict) -> dict:
    return {"runner": runner_section(steps, eval_splits),
            "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-3},
            "downstream_expert": {"datarc": {"num_workers": 0, **datarc}, "modelrc": modelrc}}


UTTERANCE_MODEL = {"projector_dim": 8, "select": "UtteranceLevel", "UtteranceLevel": {"pooling": "MeanPooling"}}


def write_iemocap(root: Path, rng: np.random.Generator) -> dict:
    """IEMOCAP with two sessions; fold1 tests on Session1. Returns the datarc (root, meta_data)."""
    labels = ["neu", "hap", "ang", "sad"]
    entries: dict[str, list[dict]] = {"Session1": [], "Session2": []}
    for session, count in (("Session1", 4), ("Session2", 8)):
        speaker = f"Ses0{session[-1]}F"
        for i in range(count):
            name = f"{speaker}_impro01_F{i:03d}"
            rel = f"{session}/sentences/wav/{speaker}_impro01/{name}.wav"
            _tone(root / rel, rng, i % 4)
            entries[session].append({"path": rel, "label": labels[i % 4], "speaker": speaker})
    meta = root / "meta_data" / "Session1"
    meta.mkdir(parents=True)
    for split, items in (("train", entries["Session2"]), ("test", entries["Session1"])):
        (meta / f"{split}_meta_data.json").write_text(json.dumps({"labels": {k: i for i, k in enumerate(labels)},
                                                                  "meta_data": items}))
    return {"root": str(root), "meta_data": str(root / "meta_data"), "test_fold": "fold1", "pre_load": True,
            "train_batch_size": 2, "eval_batch_size": 2, "valid_ratio": 0.25}


LIBRI_WORDS = ["HI", "NO", "ON", "GO"]


def write_librispeech(root: Path, rng: np.random.Generator) -> dict:
    """train-clean-100, dev-clean and test-clean with one chapter each, bucket CSVs and a character dictionary."""
    buckets = root / "len_for_bucket"
    buckets.mkdir(parents=True)
    for s, split in enumerate(("train-clean-100", "dev-clean", "test-clean")):
        speaker, chapter = 100 + s, 200 + s
        folder = root / split / str(speaker) / str(chapter)
        lines, rows = [], [",file_path,length,label"]
        for u in range(4 if s == 0 else 2):
            uid = f"{speaker}-{chapter}-{u:04d}"
            words = [LIBRI_WORDS[(u + k) % 4] for k in range(2)]
            _tone(folder / f"{uid}.flac", rng, u % 4)
            lines.append(f"{uid} {' '.join(words)}")
            rows.append(f"{u},{split}/{speaker}/{chapter}/{uid}.flac,{RATE // 2},")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
        (buckets / f"{split}.csv").write_text("\n".join(rows) + "\n")
    letters = sorted(set("".join(LIBRI_WORDS))) + ["|"]
    (root / "char.dict").write_text("".join(f"{c} 1\n" for c in letters))
    return {"train": ["train-clean-100"], "dev-clean": ["dev-clean"], "test-clean": ["test-clean"],
            "train_batch_size": 2, "batch_size": 2, "eval_batch_size": 1, "libri_root": str(root),
            "bucket_file": str(buckets), "dict_path": str(root / "char.dict"), "zero_infinity": True,
            "decoder_args": {"decoder_type": "None"}}


ASR_MODEL = {"project_dim": 8, "select": "RNNs",
             "RNNs": {"total_rate": -1, "module": "LSTM", "bidirection": True, "dim": [8], "dropout": [0.0],
                      "layer_norm": [False], "proj": [False], "sample_rate": [1], "sample_style": "concat"}}


def write_voxceleb1(root: Path, rng: np.random.Generator) -> dict:
    """Three speakers, each with train (1), dev (2) and test (3) utterances; test audio under test/wav."""
    lines = []
    for speaker in range(3):
        for n, split in enumerate((1, 1, 2, 3)):
            rel = f"id{10001 + speaker}/video{n}/{n + 1:05d}.wav"
            _tone(root / ("test" if split == 3 else "dev") / "wav" / rel, rng, speaker)
            lines.append(f"{split} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return {"file_path": str(root), "meta_data": str(root / "iden_split.txt"), "train_batch_size": 2,
            "eval_batch_size": 1, "max_timestep": 6000}


def write_fluent_commands(root: Path, rng: np.random.Generator) -> dict:
    """fluent_speech_commands_dataset: three intents, the same ones in every split."""
    intents = [("activate", "lights", "kitchen"), ("deactivate", "lights", "none"), ("increase", "heat", "none")]
    (root / "data").mkdir(parents=True)
    for split, count in (("train", 6), ("valid", 3), ("test", 3)):
        rows = [",path,speakerId,transcription,action,object,location"]
        for i in range(count):
            action, obj, location = intents[i % 3]
            rel = f"wavs/speakers/spk{i % 2}/{split}{i}.wav"
            _tone(root / rel, rng, i % 3)
            rows.append(f"{i},{rel},spk{i % 2},{action} the {obj},{action},{obj},{location}")
        (root / "data" / f"{split}_data.csv").write_text("\n".join(rows) + "\n")
    return {"file_path": str(root), "train_batch_size": 2, "eval_batch_size": 2}


# task -> (writer, modelrc, the dev split the runner evaluates during training)
TASKS = {
    "emotion": (write_iemocap, UTTERANCE_MODEL, "dev"),
    "asr": (write_librispeech, ASR_MODEL, "dev-clean"),
    "voxceleb1": (write_voxceleb1, UTTERANCE_MODEL, "dev"),
    "fluent_commands": (write_fluent_commands, UTTERANCE_MODEL, "dev"),
}


def write_all(root: Path, steps: int = 2) -> dict[str, tuple[Path, Path]]:
    """Every task's corpus and a config for it: task -> (corpus root, config path)."""
    rng = np.random.default_rng(0)
    out = {}
    for task, (writer, modelrc, dev) in TASKS.items():
        data = root / task / "data"
        datarc = writer(data, rng)
        config = root / task / "config.yaml"
        config.write_text(json.dumps(_config(steps, [dev], datarc, modelrc)))  # JSON is YAML
        out[task] = (data, config)
    return out
