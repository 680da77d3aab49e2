"""A miniature MSP-Podcast release (Audios/, Labels/, Transcripts/) with tones standing in for speech."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf

from adaltm_downstream.common.corpus import CLASSES
from adaltm_recipes.demo_corpus import write_labels

LONG = {"A": "Angry", "C": "Contempt", "D": "Disgust", "F": "Fear", "H": "Happy", "N": "Neutral", "S": "Sad",
        "U": "Surprise", "O": "Other"}
WORDS = ["blue", "green", "red", "cat", "dog", "sun", "one", "two", "three", "go", "stop", "take"]


def tone(code: str, seconds: float, rng: np.random.Generator, rate: int = 16000) -> np.ndarray:
    base = 120 + 40 * ("ACDFHNSU".index(code) if code in CLASSES else 3)
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * base * t * (1 + 0.1 * np.sin(2 * np.pi * 3 * t)))
    return (wav + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def write_mini_msp(root: Path, per_split: dict[str, int] | None = None, seed: int = 0) -> dict:
    """Returns facts the tests check against: rows per split and class, files without transcript, etc."""
    per_split = per_split or {"Train": 24, "Development": 10, "Test1": 10}
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    (root / "Audios").mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(exist_ok=True)
    (root / "Transcripts").mkdir(exist_ok=True)
    consensus, detailed, facts = [], [], {"rows": {}, "no_transcript": [], "votes": {}}
    speaker = 0
    for split, count in per_split.items():
        codes = [CLASSES[i % 8] for i in range(count - 2)] + ["X", "O"]
        for i, code in enumerate(codes):
            name = f"MSP-PODCAST_{split[:4]}_{i:04d}.wav"
            seconds = float(rng.uniform(0.4, 1.6))
            sf.write(root / "Audios" / name, tone(code, seconds, rng), 16000, subtype="PCM_16")
            speaker += i % 3 == 0
            consensus.append({"FileName": name, "EmoClass": code, "EmoAct": 3.0, "EmoVal": 4.0, "EmoDom": 4.0,
                              "SpkrID": f"{split}_{speaker}", "Gender": "Female", "Split_Set": split})
            votes = [code if code in CLASSES else pick.choice(CLASSES), code if code in CLASSES else "O",
                     pick.choice(CLASSES)]
            facts["votes"][name] = votes
            for worker, vote in enumerate(votes):
                detailed.append({"FileName": name, "WorkerID": f"w{worker}", "EmoClass_Major": LONG[vote],
                                 "EmoAct": 3, "EmoVal": 4, "EmoDom": 4})
            if i % 5 == 4:
                facts["no_transcript"].append(name)
            else:
                words = " ".join(pick.choice(WORDS) for _ in range(3))
                (root / "Transcripts" / name.replace(".wav", ".txt")).write_text(words.upper() + ".\n")
        facts["rows"][split] = codes
    write_labels(root, consensus, detailed)
    return facts
