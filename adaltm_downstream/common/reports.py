"""What an evaluation leaves in the experiment directory: predictions, metrics JSON, plots, tensorboard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adaltm_core.files import atomic_savefig, atomic_write_text
from adaltm_downstream.common.corpus import CLASS_NAMES


def write_predictions(path: Path, files: list[str], labels: list[int], probabilities: np.ndarray,
                      speakers: list[str]) -> None:
    """One row per utterance; `adaltm compare` and `adaltm table` read it back (speaker: speaker-level CIs)."""
    header = "\t".join(["file", "label", "pred"] + [f"p_{k}" for k in range(probabilities.shape[1])] + ["speaker"])
    rows = [header] + ["\t".join([f, str(int(y)), str(int(p.argmax()))] + [f"{v:.6f}" for v in p] + [s])
                       for f, y, p, s in zip(files, labels, probabilities, speakers)]
    atomic_write_text(path, "\n".join(rows) + "\n")


def write_transcripts(path: Path, files: list[str], references: list[str], hypotheses: list[str]) -> None:
    rows = ["file\tref\thyp"] + [f"{f}\t{r}\t{h}" for f, r, h in zip(files, references, hypotheses)]
    atomic_write_text(path, "\n".join(rows) + "\n")


def write_metrics(path: Path, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=1) + "\n")


def plot_confusion(path: Path, confusion: list[list[int]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion, dtype=float)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference (consensus)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def log_scalars(logger, prefix: str, metrics: dict, step: int) -> None:
    for key, value in metrics.items():
        if isinstance(value, float):
            logger.add_scalar(f"{prefix}-{key}", value, global_step=step)


def summary_line(name: str, split: str, test_set: str, step: int, metrics: dict) -> str:
    parts = []
    for key in ("uar", "precision", "macro_f1"):
        if key in metrics:
            lo, hi = metrics["ci95"][key]
            parts.append(f"{key.upper() if key == 'uar' else key} {metrics[key]:.4f} [{lo:.4f}, {hi:.4f}]")
    for key in ("wer", "cer"):
        if key in metrics:
            parts.append(f"{key.upper()} {metrics[key]:.4f}")
    return f"[{name}] {split} ({test_set}) step {step}: " + ", ".join(parts) + f", loss {metrics['loss']:.4f}"
