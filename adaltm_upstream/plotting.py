"""Figures: λ per layer group (the paper's Figures 2/3), read from experiment checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_savefig
from adaltm_upstream import states
from adaltm_upstream.checkpoints import torch_load


def selected_checkpoint(expdir: str | Path) -> Path:
    """The model a run selected (`dev-best.ckpt`), else its latest `states-N.ckpt` (other names, such as a user's
    `states-old.ckpt`, are not the runner's)."""
    expdir = Path(expdir)
    if not expdir.is_dir():
        raise UserError(f"{expdir}: not an experiment directory")
    best = expdir / "dev-best.ckpt"
    if best.is_file():
        return best
    saved = [p for p in expdir.glob("states-*.ckpt") if p.stem.split("-", 1)[1].isdigit()]
    if not saved:
        raise UserError(f"{expdir}: no dev-best.ckpt or states-<step>.ckpt in this experiment directory")
    return max(saved, key=lambda p: int(p.stem.split("-", 1)[1]))


def read_lambdas(expdir: str | Path) -> tuple[list[str], list[list[float]], bool]:
    """(tasks, λ as merged, rows × tasks, whether rows are tensors (tensorwise) rather than groups)."""
    path = selected_checkpoint(expdir)
    checkpoint = torch_load(path)
    upstream = checkpoint.get("Upstream") if isinstance(checkpoint, dict) else None
    found = states.read_lambdas(upstream) if isinstance(upstream, dict) else None
    if found is None:
        raise UserError(f"{path}: no learned λ (not an adaltm_wavlm run with trainable λ)")
    tasks, lambdas = found
    if not torch.isfinite(lambdas).all():
        raise UserError(f"{path}: λ are not finite (NaN or Inf: the run diverged); plot an earlier checkpoint")
    return tasks, lambdas.tolist(), not states.lambda_rows(upstream)[0].startswith("group_")


# What the start of a figure file is, per format matplotlib writes by suffix.
FIGURE_MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml", ".jpg": b"\xff\xd8", ".jpeg": b"\xff\xd8"}


def is_figure(path: Path) -> bool:
    """Whether `path` is a figure file (what an earlier `plot-lambdas -o` wrote), judged by its first bytes."""
    magic = FIGURE_MAGIC.get(path.suffix.lower(), b"\x89PNG")
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def plot_lambdas(expdirs: list[str], output: str | Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    per_tensor = False
    for i, expdir in enumerate(expdirs):
        tasks, lambdas, tensors = read_lambdas(expdir)
        per_tensor |= tensors
        run = labels[i] if labels else Path(expdir).name
        groups = list(range(len(lambdas)))
        for t, task in enumerate(tasks):
            ax.plot(groups, [row[t] for row in lambdas], marker="o", markersize=3, label=f"{run}: λ_{task}")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("tensor, in layer-group order (tensorwise λ)" if per_tensor
                  else "layer group (0 = CNN + positional conv, l = transformer layer l)")
    ax.set_ylabel("λ")
    ax.set_title("Learned merging coefficients per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, output, dpi=120)
    return Path(output)
