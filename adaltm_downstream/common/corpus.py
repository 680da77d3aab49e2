"""MSP-Podcast as released (and EMO-SUPERB's label CSVs): read once, validate once, report every problem at once.

Release layout under `root`:
  Audios/<FileName>                  Labels/labels_consensus.csv   FileName,EmoClass,...,SpkrID,...,Split_Set
  Transcripts/<stem>.txt             Labels/labels_detailed.csv    one row per annotator vote (EmoClass_Major)
Classes, in this order everywhere: A C D F H N S U (anger, contempt, disgust, fear, happiness, neutral, sadness,
surprise). O (other) and X (no agreement) are never evaluated.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adaltm_core.audio import SAMPLE_RATE, AudioError, info
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
    min_samples: int = 400                 # the CNN's receptive field at 16 kHz (WavLM: 400 samples, 25 ms)


def _vote_code(value: str) -> str | None:
    value = value.strip()
    if value.upper() in CLASSES + NOT_EVALUATED:
        return value.upper()
    key = value.lower().split("-")[0].split("(")[0].strip()
    return VOTE_NAMES.get(key)


def _read_utf8(path: Path) -> str:
    """The text of `path`, strictly UTF-8 (a BOM is dropped): never replacement characters, since transcripts
    become WER references; a CorpusError names the line and the offending bytes."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise CorpusError(f"{path}:{line}: not UTF-8 ({error.reason}: byte(s) "
                          f"{data[error.start:error.end]!r} at offset {error.start}); re-encode the file as UTF-8, "
                          "e.g. iconv -f latin1 -t utf-8") from None


def _read_csv(path: Path, required: tuple[str, ...], problems: list[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every well-formed row; malformed rows go to `problems`."""
    if not path.is_file():
        raise CorpusError(f"{path}: label file not found")
    reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise CorpusError(f"{path}: missing column(s) {', '.join(missing)} (found {reader.fieldnames})")
    rows = []
    for row in reader:
        problem = _malformed_row(row, required, len(reader.fieldnames or []))
        if problem:
            problems.append(f"{path}:{reader.line_num}: {problem}")
        else:
            rows.append((reader.line_num, row))
    return rows


def _malformed_row(row: dict, required: tuple[str, ...], width: int) -> str | None:
    """csv.DictReader fills missing fields with None and files surplus ones under the key None."""
    fields = width - sum(v is None for v in row.values()) + len(row.get(None) or [])
    if fields != width:
        return f"{fields} field(s), the header has {width}"
    empty = [c for c in required if not row[c].strip()]
    return f"empty {', '.join(empty)}" if empty else None


def _row_problems(path: Path, rows: list[tuple[int, dict[str, str]]]) -> list[str]:
    """Problems across rows. Rows whose FileName leaves the audio directory are also taken out of `rows`, so that
    nothing is ever read from there."""
    outside = _outside_audio(path, rows)
    rows[:] = [(line, row) for line, row in rows if line not in outside]
    return list(outside.values()) + _duplicate_rows(path, rows) + _split_leaks(path, rows)


def _outside_audio(path: Path, rows: list[tuple[int, dict[str, str]]]) -> dict[int, str]:
    """A FileName is a path inside the audio directory: `../../etc/passwd` or `/abs/x.wav` would be read from
    anywhere on the machine."""
    problems = {}
    for line, row in rows:
        name = row["FileName"].strip()
        normal = os.path.normpath(name)
        if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
            problems[line] = (f"{path}:{line}: FileName {name!r} leaves the audio directory; label files name "
                              "files inside it (Audios/<FileName>)")
    return problems


def _duplicate_rows(path: Path, rows: list[tuple[int, dict[str, str]]]) -> list[str]:
    """The same FileName labelled twice in one split: counted twice, weighted twice."""
    first: dict[tuple[str, str], int] = {}
    problems = []
    for line, row in rows:
        key = (os.path.normpath(row["FileName"].strip()), row["Split_Set"].strip())
        if key in first:
            problems.append(f"{path}:{line}: duplicate label row for {row['FileName']} (first on line {first[key]})")
        else:
            first[key] = line
    return problems


def _split_leaks(path: Path, rows: list[tuple[int, dict[str, str]]]) -> list[str]:
    """The same audio file labelled in two splits (e.g. Train and Test1): a train/test leak."""
    seen: dict[str, tuple[str, int]] = {}
    problems = []
    for line, row in rows:
        name, split = os.path.normpath(row["FileName"].strip()), row["Split_Set"].strip()
        if name in seen and seen[name][0] != split:
            problems.append(f"{path}:{line}: {row['FileName']} is labelled in {split} and in {seen[name][0]} "
                            f"(line {seen[name][1]}): a file may belong to one split only")
        seen.setdefault(name, (split, line))
    return problems


def _soft_from_votes(path: Path, problems: list[str]) -> dict[str, list[float]]:
    votes: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(CLASSES))
    for line, row in _read_csv(path, ("FileName", "EmoClass_Major"), problems):
        code = _vote_code(row["EmoClass_Major"])
        if code is None:
            problems.append(f"{path}:{line}: unknown emotion {row['EmoClass_Major']!r} for {row['FileName']}")
        elif code in CLASSES:
            votes[row["FileName"]][CLASSES.index(code)] += 1.0
    return {f: [v / sum(counts) for v in counts] for f, counts in votes.items() if sum(counts) > 0}


def _read_msp(spec: CorpusSpec, problems: list[str]) -> list[Utterance]:
    labels = spec.root / "Labels"
    rows = _read_csv(labels / "labels_consensus.csv", ("FileName", "EmoClass", "Split_Set"), problems)
    problems += _row_problems(labels / "labels_consensus.csv", rows)
    detailed = labels / "labels_detailed.csv"
    soft = _soft_from_votes(detailed, problems) if spec.soft_labels and detailed.is_file() else {}
    utterances = []
    for line, row in rows:
        code = row["EmoClass"].strip().upper()
        if code not in CLASSES + NOT_EVALUATED:
            problems.append(f"{labels / 'labels_consensus.csv'}:{line}: unknown EmoClass {row['EmoClass']!r} "
                            f"for {row['FileName']}")
            continue
        utterances.append(Utterance(row["FileName"], spec.root / spec.audio_dir / row["FileName"],
                                    row["Split_Set"].strip(), row.get("SpkrID", "").strip(), code,
                                    soft.get(row["FileName"])))
    return utterances


# Columns of EMO-SUPERB's label files that are not emotions (its CSVs: FileName, <emotions>, EmoAct, EmoVal, EmoDom,
# SpkrID, Gender, Split_Set).
EMO_SUPERB_METADATA = ("FileName", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set", "EmoClass")


def _emotion_columns(spec: CorpusSpec, header: list[str]) -> dict[str, str]:
    """Class code -> column; refuses anything but the 8 classes (EMO-SUPERB's Secondary task has 16)."""
    emotions = [c for c in header if c.strip() not in EMO_SUPERB_METADATA and c.strip().lower() != "other"]
    columns = {VOTE_NAMES.get(c.strip().lower()): c for c in emotions}
    extra = [c for c in emotions if VOTE_NAMES.get(c.strip().lower()) not in CLASSES]
    if extra:
        raise CorpusError(f"{spec.labels_csv}: {len(emotions)} emotion columns, among them {', '.join(extra)}: "
                          "this is not the 8-class Primary task (EMO-SUPERB's Secondary task has 16 classes), and "
                          "only the 8 classes A C D F H N S U are supported; point datarc.labels_csv at the Primary "
                          "folder's labels_consensus_<fold>.csv")
    missing = [c for c in CLASSES if c not in columns]
    if missing:
        raise CorpusError(f"{spec.labels_csv}: no column for class(es) {', '.join(missing)}; expected one column "
                          f"per emotion (angry, contempt, disgust, fear, happy, neutral, sad, surprise), "
                          f"found {header}")
    return columns


def _read_emo_superb(spec: CorpusSpec, problems: list[str]) -> list[Utterance]:
    """Soft labels are taken as the file gives them (EMO-SUPERB thresholds and trains on them unrenormalised);
    utterances sorted by file name, the order of its split lists (so unbucketed evaluation batches are its own)."""
    if spec.labels_csv is None:
        raise CorpusError("datarc.labels_csv: required when datarc.layout is emo_superb")
    rows = sorted(_read_csv(spec.labels_csv, ("FileName", "Split_Set"), problems),
                  key=lambda numbered: numbered[1]["FileName"])
    problems += _row_problems(spec.labels_csv, rows)
    with open(spec.labels_csv, newline="", encoding="utf-8-sig") as handle:
        columns = _emotion_columns(spec, next(csv.reader(handle)))
    utterances = []
    for line, row in rows:
        try:
            values = [float(row[columns[c]]) for c in CLASSES]
        except ValueError:
            problems.append(f"{spec.labels_csv}:{line}: non-numeric soft label for {row['FileName']}")
            continue
        usable = sum(values) > 0
        consensus = CLASSES[max(range(len(CLASSES)), key=values.__getitem__)] if usable else "X"
        utterances.append(Utterance(row["FileName"], spec.root / spec.audio_dir / row["FileName"],
                                    row["Split_Set"].strip(), row.get("SpkrID", "").strip(), consensus,
                                    values if usable else None))
    return utterances


def _attach_transcripts(spec: CorpusSpec, utterances: list[Utterance], problems: list[str]) -> None:
    directory = spec.root / "Transcripts"
    for utt in utterances:
        path = directory / (Path(utt.file).stem + ".txt")
        if path.is_file():
            try:
                utt.transcript = _read_utf8(path).strip() or None
            except CorpusError as error:
                problems.append(str(error))


def _probe(utt: Utterance, min_samples: int) -> str | None:
    try:
        meta = info(utt.path)
    except AudioError as error:
        return f"{utt.path}: missing audio file" if not utt.path.exists() else str(error)
    if meta.num_frames == 0:
        return f"{utt.path}: empty audio (0 samples)"
    utt.seconds = meta.num_frames / meta.sample_rate
    return _too_short(utt.path, meta.num_frames * SAMPLE_RATE // meta.sample_rate, min_samples)


def _too_short(path: Path, samples: int, min_samples: int) -> str | None:
    """Audio shorter than the CNN's receptive field gives the model no frame at all (found here, not mid-training)."""
    if samples >= min_samples:
        return None
    return (f"{path}: {samples} samples at 16 kHz, shorter than the model's receptive field of {min_samples} "
            "samples (datarc.min_samples); drop the file from the labels")


def load_corpus(spec: CorpusSpec, splits: list[str], keys: dict[str, str] | None = None) -> dict[str, list[Utterance]]:
    """Utterances of the requested Split_Set values, audio headers checked; raises one CorpusError listing
    every missing/unreadable/empty file and every unknown label. `keys`: Split_Set -> the config key naming it."""
    if not spec.root.is_dir():
        raise CorpusError(f"datarc.root: {spec.root} is not a directory")
    problems: list[str] = []
    utterances = _read_msp(spec, problems) if spec.layout == "msp" else _read_emo_superb(spec, problems)
    _check_splits(spec, utterances, splits, keys or {})
    _attach_transcripts(spec, [u for u in utterances if u.split in splits], problems)
    wanted = [u for u in utterances if u.split in splits]
    if spec.require_transcript:
        wanted = [u for u in wanted if u.transcript]
        untranscribed = [s for s in splits if not any(u.split == s for u in wanted)]
        if untranscribed:
            problems.append(f"{spec.root}: no utterance of Split_Set {', '.join(untranscribed)} has a transcript "
                            f"in {spec.root / 'Transcripts'}, and transcripts are required (datarc."
                            "require_transcript: true, or a downstream that trains ASR); for emotion alone set "
                            "-o config.downstream_expert.datarc.require_transcript=false")
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 2) * 4)) as pool:
        problems += [p for p in pool.map(_probe, wanted, [spec.min_samples] * len(wanted)) if p]
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise CorpusError(f"{spec.root}: {len(problems)} problem(s) in the corpus:\n  " + "\n  ".join(shown))
    return {s: [u for u in wanted if u.split == s] for s in splits}


def _check_splits(spec: CorpusSpec, utterances: list[Utterance], splits: list[str], keys: dict[str, str]) -> None:
    present = sorted({u.split for u in utterances})
    absent = [s for s in splits if s not in present]
    if absent:
        source = spec.labels_csv if spec.layout == "emo_superb" else spec.root / "Labels" / "labels_consensus.csv"
        fixes = ", ".join(f"{keys.get(s, 'datarc.splits')} (now {s})" for s in absent)
        similar = next((p for p in present if p[:4].lower() == absent[0][:4].lower()), present[0] if present else "")
        raise CorpusError(f"{source}: no Split_Set {', '.join(absent)} (present: {', '.join(present)}); set {fixes} "
                          f"to one of the present names, e.g. -o config.downstream_expert."
                          f"{keys.get(absent[0], 'datarc.splits.test')}={similar}")
