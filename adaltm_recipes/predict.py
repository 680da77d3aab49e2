"""Using a trained emotion classifier on audio: `adaltm predict`, and the pipeline's score on labelled files.

In: MODEL, a directory from `adaltm export --format hf-classifier` (any transformers audio classifier works), or a
run directory / states file, exported into a temporary directory first; AUDIO files and folders (folders are
searched for the suffixes soundfile reads; any rate and channel count: mixed to mono and resampled to 16 kHz by
`adaltm_core.audio`, as the runs read their corpora). Transformed: transformers' `AutoModelForAudioClassification`
with its feature extractor, on batches of similar length padded with an attention mask; a model whose CNN
normalises over time (group norm) sees padding, so it only batches equal lengths. Out: OUT.tsv or OUT.csv, written
atomically: one row per file, or per chunk with `chunk` seconds; files that cannot be read are listed in the result,
one line each, and the others still run.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from adaltm_core.audio import SAMPLE_RATE, AudioError, info, load_mono_16k
from adaltm_core.errors import UserError
from adaltm_core.files import atomic_write_text
from adaltm_downstream.common.metrics import emotion_metrics
from adaltm_s3prl.classifier_export import export_classifier

AUDIO_SUFFIXES = frozenset({f".{name.lower()}" for name in sf.available_formats()} | {".aif", ".oga", ".opus"})


@dataclass
class Classifier:
    model: torch.nn.Module
    extractor: object
    labels: list[str]
    min_samples: int          # the CNN's receptive field: shorter audio has no frame
    equal_lengths_only: bool  # group-norm CNN: padding would change the features

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def probabilities(self, wavs: list[np.ndarray]) -> np.ndarray:
        inputs = self.extractor(wavs, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True,
                                return_tensors="pt")
        with torch.inference_mode(), warnings.catch_warnings():
            # transformers' WavLM attention hands torch a bool padding mask beside a float bias (harmless here)
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits
        return logits.float().softmax(dim=-1).cpu().numpy()


@dataclass
class Prediction:
    output: Path
    rows: int
    files: int
    seconds: float            # of audio
    elapsed: float            # wall time
    skipped: list[str] = field(default_factory=list)   # one line per unreadable file: "FILE: cause"


def load_classifier(model: str | Path, device: str | torch.device | None = None) -> Classifier:
    """An exported classifier directory, loaded on `device` (default: CUDA when available)."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    path, target = Path(model), _device(device)
    if not (path / "config.json").is_file():
        raise UserError(f"{model}: not a classifier directory (no config.json); give the output of `adaltm export "
                        "--format hf-classifier`, or a run directory")
    try:
        network = AutoModelForAudioClassification.from_pretrained(path)
        extractor = AutoFeatureExtractor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{model}: not a transformers audio classifier ({first})") from None
    network = network.to(target).eval()
    config = network.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    receptive = 1
    geometry = zip(getattr(config, "conv_kernel", ()), getattr(config, "conv_stride", ()))
    for kernel, stride in reversed(list(geometry)):
        receptive = (receptive - 1) * stride + kernel
    return Classifier(network, extractor, labels, receptive, getattr(config, "feat_extract_norm", "") == "group")


def _device(name: str | torch.device | None) -> torch.device:
    """`--device`, checked: CUDA when available and nothing was asked."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return device


def _model_directory(model: str | Path, scratch: Path) -> Path:
    """MODEL as a classifier directory: a run (a directory with dev-best.ckpt, or a states file) is exported."""
    path = Path(model)
    if (path / "config.json").is_file():
        return path
    if path.is_file() or (path / "dev-best.ckpt").is_file():
        print(f"exporting {model} as a classifier first (`adaltm export --format hf-classifier` keeps one)")
        return export_classifier(path, scratch / "classifier")
    raise UserError(f"{model}: neither a classifier directory (config.json) nor a run (dev-best.ckpt)")


def audio_files(inputs: list[str | Path]) -> list[Path]:
    """Files as given, and every audio file under each folder (sorted); a missing input is refused."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                            and not p.name.startswith("."))
        elif item.exists():
            found.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not found:
        raise UserError(f"{', '.join(map(str, inputs))}: no audio file (suffixes: {', '.join(sorted(AUDIO_SUFFIXES))})")
    return found


@dataclass(frozen=True)
class Span:
    file: int     # index into the file list
    start: int    # samples at 16 kHz
    end: int


def _spans(index: int, samples: int, chunk: int | None, min_samples: int) -> list[Span]:
    """The whole file, or consecutive chunks; a last chunk shorter than the receptive field joins the one before."""
    if chunk is None:
        return [Span(index, 0, samples)]
    starts = list(range(0, samples, chunk))
    if len(starts) > 1 and samples - starts[-1] < min_samples:
        starts.pop()
    return [Span(index, s, starts[i + 1] if i + 1 < len(starts) else samples) for i, s in enumerate(starts)]


def _batches(spans: list[Span], size: int, equal_lengths_only: bool) -> Iterator[list[Span]]:
    """Spans sorted by length, `size` at a time (equal lengths only, when padding would change the features)."""
    batch: list[Span] = []
    for span in sorted(spans, key=lambda s: s.end - s.start):
        length = span.end - span.start
        if batch and (len(batch) == size or (equal_lengths_only and batch[0].end - batch[0].start != length)):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def predict(model: str | Path, inputs: list[str | Path], output: str | Path, chunk: float | None = None,
            device: str | torch.device | None = None, batch_size: int = 8) -> Prediction:
    """Write one row per file (or chunk) of `inputs` into `output` (.tsv or .csv); unreadable files are skipped and
    listed in the result."""
    output = Path(output)
    files = audio_files(inputs)
    if any(output.resolve() == f.resolve() for f in files):
        raise UserError(f"-o {output}: this is one of the audio inputs; choose another output file")
    if output.suffix.lower() not in (".tsv", ".csv"):
        raise UserError(f"-o {output}: the output must end in .tsv or .csv")
    if output.is_dir():
        raise UserError(f"-o {output}: a folder; give a file name ending in .tsv or .csv")
    started, device = time.monotonic(), _device(device)   # checked before a run is exported
    with tempfile.TemporaryDirectory(prefix="adaltm-predict-") as scratch:
        classifier = load_classifier(_model_directory(model, Path(scratch)), device)
        chunk_samples = None if chunk is None else max(int(round(chunk * SAMPLE_RATE)), classifier.min_samples)
        skipped: dict[int, str] = {}
        spans: list[Span] = []
        for index, path in enumerate(files):   # headers only: lengths for batching, and the first bad files
            try:
                meta = info(path)
            except AudioError as error:
                skipped[index] = str(error)
                continue
            # the length after resampling, as torchaudio's resample makes it
            samples = math.ceil(meta.num_frames * SAMPLE_RATE / meta.sample_rate) if meta.sample_rate else 0
            if samples < classifier.min_samples:
                skipped[index] = (f"{path}: too short ({samples} samples at 16 kHz; the model needs at least "
                                  f"{classifier.min_samples})")
                continue
            spans += _spans(index, samples, chunk_samples, classifier.min_samples)
        results = _run(classifier, files, spans, batch_size, skipped)
    rows = [(span, p) for span, p in sorted(results.items(), key=lambda item: (item[0].file, item[0].start))
            if span.file not in skipped]
    if not rows:
        raise UserError(f"no file could be read ({len(skipped)} tried): " + "; ".join(skipped.values()))
    atomic_write_text(output, _table(files, rows, classifier.labels, chunk is not None, output.suffix.lower()))
    return Prediction(output, len(rows), len({span.file for span, _ in rows}),
                      sum(span.end - span.start for span, _ in rows) / SAMPLE_RATE, time.monotonic() - started,
                      [skipped[i] for i in sorted(skipped)])


def _run(classifier: Classifier, files: list[Path], spans: list[Span], batch_size: int,
         skipped: dict[int, str]) -> dict[Span, np.ndarray]:
    """Probabilities per span; a file that fails to decode joins `skipped` and its spans are dropped."""

    @lru_cache(maxsize=2)  # the chunks of one file arrive together: it is decoded once
    def waveform(index: int) -> np.ndarray:
        return load_mono_16k(files[index]).numpy()

    results: dict[Span, np.ndarray] = {}
    with tqdm(total=len(spans), unit="chunk" if any(s.start for s in spans) else "file", desc="predict") as bar:
        for batch in _batches(spans, batch_size, classifier.equal_lengths_only):
            ready = []
            for span in batch:
                if span.file in skipped:
                    continue
                try:
                    wav = waveform(span.file)
                except AudioError as error:
                    skipped[span.file] = str(error)
                    continue
                if len(wav) < span.end:   # the header's length, resampled, is exact for intact files
                    skipped[span.file] = f"{files[span.file]}: decodes to fewer samples than its header says"
                    continue
                ready.append((span, wav[span.start:span.end]))
            if ready:
                for (span, _), p in zip(ready, classifier.probabilities([w for _, w in ready])):
                    results[span] = p
            bar.update(len(batch))
    return results


def _table(files: list[Path], rows: list[tuple[Span, np.ndarray]], labels: list[str], chunked: bool,
           suffix: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if suffix == ".tsv" else ",", lineterminator="\n")
    where = ["start", "end"] if chunked else []
    writer.writerow(["file", *where, "pred", "emotion", *[f"p_{name}" for name in labels]])
    for span, p in rows:
        seconds = [f"{span.start / SAMPLE_RATE:.2f}", f"{span.end / SAMPLE_RATE:.2f}"] if chunked else []
        best = int(p.argmax())
        writer.writerow([str(files[span.file]), *seconds, best, labels[best], *[f"{v:.6f}" for v in p]])
    return buffer.getvalue()


def export_and_score(run: str | Path, output: str | Path, files: list[str | Path], labels: list[int],
                     device: str | None = None) -> dict:
    """Export `run` (its directory or states) as a classifier into `output` and score the labelled `files` (class
    indices in the corpus order) with transformers' `pipeline("audio-classification")`, one file at a time as
    the pipeline runs: {"classifier", "n", "accuracy", "uar", "probabilities"} (fractions; the pipeline's
    probabilities per file, in class order)."""
    from transformers import pipeline

    directory = export_classifier(run, output)
    classify = pipeline("audio-classification", model=str(directory), device=device or "cpu")
    order = {name: index for index, name in classify.model.config.id2label.items()}
    probabilities = np.zeros((len(files), len(order)))
    for row, path in enumerate(tqdm(files, desc="pipeline", unit="file")):
        for result in classify({"raw": load_mono_16k(path).numpy(), "sampling_rate": SAMPLE_RATE}, top_k=None):
            probabilities[row, order[result["label"]]] = result["score"]
    metrics = emotion_metrics(list(labels), probabilities)
    return {"classifier": str(directory), "n": len(files), "accuracy": metrics["accuracy"], "uar": metrics["uar"],
            "probabilities": probabilities.tolist()}
