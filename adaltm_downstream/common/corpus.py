"""MSP-Podcast as released (and EMO-SUPERB's label CSVs): read once, validate once, report every problem at once.

Release layout under `root`:
  Audios/<FileName>                  Labels/labels_consensus.csv   FileName,EmoClass,...,SpkrID,...,Split_Set
  Transcripts/<stem>.txt             Labels/labels_detailed.csv    one row per annotator vote (EmoClass_Major)
Classes, in this order everywhere: A C D F H N S U (anger, contempt, disgust, fear, happiness, neutral, sadness,
surprise). O (other) and X (no agreement) are never evaluated.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adaltm_core.audio import AudioError, info
from adaltm_core.errors import UserError

CLASSES = ("A", "C", "D", "F", "H", "N", "S", "U")
CLASS_NAMES = ("anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
NOT_EVALUATED = ("O", "X")
# Annotators' long names in labels_detailed.csv (and EMO-SUPERB's column names) -> class code.
VOTE_NAMES = {"angry": "A", "anger": "A", "contempt": "C", "disgust": "D", "fear": "F", "happy": "H",
              "happiness": "H", "neutral": "N", "sad": "S", "sadness": "S", "surprise": "U", "other": "O"}


class CorpusError(UserError):
    """Everything wrong with a corpus, in one message."""


@dataclass
class Utterance:
    file: str                  # FileName as in the label files
    path: Path
    split: str                 # Split_Set value
    speaker: str
    consensus: str             # class code, O or X
    soft: list[float] | None   # distribution over CLASSES from the votes, None when no usable vote
    transcript: str | None = None
    seconds: float = 0.0

    @property
    def label(self) -> int | None:
        return CLASSES.index(self.consensus) if self.consensus in CLASSES else None

    def target(self) -> list[float]:
        """Soft target: the votes, or the consensus one-hot when there are none."""
        if self.soft is not None:
            return self.soft
        return [1.0 if c == self.consensus else 0.0 for c in CLASSES]


@dataclass
class CorpusSpec:
    root: Path
    layout: str = "msp"                    # msp | emo_superb
    labels_csv: Path | None = None         # emo_superb: labels_consensus_<fold>.csv
    require_transcript: bool = False
    soft_labels: bool = True
    audio_dir: str = "Audios"


def _vote_code(value: str) -> str | None:
    value = value.strip()
    if value.upper() in CLASSES + NOT_EVALUATED:
        return value.upper()
    key = value.lower().split("-")[0].split("(")[0].strip()
    return VOTE_NAMES.get(key)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise CorpusError(f"{path}: label file not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {', '.join(missing)} (found {reader.fieldnames})")
        return list(reader)


def _soft_from_votes(path: Path, problems: list[str]) -> dict[str, list[float]]:
    votes: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(CLASSES))
    rows = _read_csv(path, ("FileName", "EmoClass_Major"))
    for line, row in enumerate(rows, start=2):
        code = _vote_code(row["EmoClass_Major"])
        if code is None:
            problems.append(f"{path}:{line}: unknown emotion {row['EmoClass_Major']!r} for {row['FileName']}")
        elif code in CLASSES:
            votes[row["FileName"]][CLASSES.index(code)] += 1.0
    return {f: [v / sum(counts) for v in counts] for f, counts in votes.items() if sum(counts) > 0}


def _read_msp(spec: CorpusSpec, problems: list[str]) -> list[Utterance]:
    labels = spec.root / "Labels"
    rows = _read_csv(labels / "labels_consensus.csv", ("FileName", "EmoClass", "Split_Set"))
    detailed = labels / "labels_detailed.csv"
    soft = _soft_from_votes(detailed, problems) if spec.soft_labels and detailed.is_file() else {}
    utterances = []
    for line, row in enumerate(rows, start=2):
        code = row["EmoClass"].strip().upper()
        if code not in CLASSES + NOT_EVALUATED:
            problems.append(f"{labels / 'labels_consensus.csv'}:{line}: unknown EmoClass {row['EmoClass']!r} "
                            f"for {row['FileName']}")
            continue
        utterances.append(Utterance(row["FileName"], spec.root / spec.audio_dir / row["FileName"],
                                    row["Split_Set"].strip(), row.get("SpkrID", "").strip(), code,
                                    soft.get(row["FileName"])))
    return utterances


def _read_emo_superb(spec: CorpusSpec, problems: list[str]) -> list[Utterance]:
    if spec.labels_csv is None:
        raise CorpusError("datarc.labels_csv: required when datarc.layout is emo_superb")
    rows = _read_csv(spec.labels_csv, ("FileName", "Split_Set"))
    columns = {}
    for name in rows[0] if rows else []:
        code = VOTE_NAMES.get(name.strip().lower())
        if code in CLASSES:
            columns[code] = name
    if set(columns) != set(CLASSES):
        raise CorpusError(f"{spec.labels_csv}: expected one column per emotion "
                          f"(angry, contempt, disgust, fear, happy, neutral, sad, surprise), found {list(rows[0])}")
    utterances = []
    for line, row in enumerate(rows, start=2):
        try:
            values = [float(row[columns[c]]) for c in CLASSES]
        except ValueError:
            problems.append(f"{spec.labels_csv}:{line}: non-numeric soft label for {row['FileName']}")
            continue
        total = sum(values)
        soft = [v / total for v in values] if total > 0 else None
        consensus = CLASSES[max(range(len(CLASSES)), key=values.__getitem__)] if total > 0 else "X"
        utterances.append(Utterance(row["FileName"], spec.root / spec.audio_dir / row["FileName"],
                                    row["Split_Set"].strip(), row.get("SpkrID", "").strip(), consensus, soft))
    return utterances


def _attach_transcripts(spec: CorpusSpec, utterances: list[Utterance]) -> None:
    directory = spec.root / "Transcripts"
    for utt in utterances:
        path = directory / (Path(utt.file).stem + ".txt")
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            utt.transcript = text or None


def _probe(utt: Utterance) -> str | None:
    try:
        meta = info(utt.path)
    except AudioError as error:
        return f"{utt.path}: missing audio file" if not utt.path.exists() else str(error)
    if meta.num_frames == 0:
        return f"{utt.path}: empty audio (0 samples)"
    utt.seconds = meta.num_frames / meta.sample_rate
    return None


def load_corpus(spec: CorpusSpec, splits: list[str]) -> dict[str, list[Utterance]]:
    """Utterances of the requested Split_Set values, audio headers checked; raises one CorpusError listing
    every missing/unreadable/empty file and every unknown label."""
    if not spec.root.is_dir():
        raise CorpusError(f"datarc.root: {spec.root} is not a directory")
    problems: list[str] = []
    utterances = _read_msp(spec, problems) if spec.layout == "msp" else _read_emo_superb(spec, problems)
    _attach_transcripts(spec, utterances)
    wanted = [u for u in utterances if u.split in splits]
    if spec.require_transcript:
        wanted = [u for u in wanted if u.transcript]
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 2) * 4)) as pool:
        problems += [p for p in pool.map(_probe, wanted) if p]
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise CorpusError(f"{spec.root}: {len(problems)} problem(s) in the corpus:\n  " + "\n  ".join(shown))
    by_split = {s: [u for u in wanted if u.split == s] for s in splits}
    empty = [s for s, items in by_split.items() if not items]
    if empty:
        raise CorpusError(f"{spec.root}: no utterances for Split_Set {', '.join(empty)} "
                          f"(present: {', '.join(sorted({u.split for u in utterances}))})")
    return by_split
