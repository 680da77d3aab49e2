"""A pretrained demo base: HuBERT-style masked prediction of k-means units, on a small WavLM, on the CPU.

Why: a randomly initialised base gives the demo a frozen baseline at chance and task vectors that look like
miracles. This stage gives the base what WavLM-Large brings to the paper, at toy scale: representations learned
without labels from the corpus's own audio.

Recipe (HuBERT's first iteration, Hsu et al. 2021, arXiv 2106.07447; WavLM, Chen et al. 2022, arXiv 2110.13900,
uses the same objective): frame features of the unlabelled audio -> k-means -> one discrete unit per 20 ms frame;
spans of frames after the feature projection are replaced by the learned mask embedding and the transformer must
predict the units of the masked frames (plus, with a smaller weight, of the unmasked ones: with a few hundred steps
this teaches the CNN the frame features quickly). Two departures from HuBERT, both for an emotion demo whose
classes are prosody: the frame features are MFCCs (+Δ, ΔΔ) *and* log F0 with a voicing flag, and the prediction
head is one linear layer (HuBERT: projection + cosine similarity to unit embeddings).

Deterministic per seed: every random draw (unit initialisation, batch order, masks, dropout) is a function of
(seed, step), so a run resumed from its state file reaches the same weights as an uninterrupted one. The state
(`work/pretrain-state.ckpt`) is written atomically every `save_every` steps; the result is a microsoft/unilm
checkpoint (`adaltm_upstream.export.write_unilm_checkpoint`), loaded by everything downstream like any WavLM.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from tqdm import tqdm
from transformers import WavLMConfig

from adaltm_core.audio import load_mono_16k
from adaltm_core.errors import UserError
from adaltm_core.files import atomic_torch_save
from adaltm_upstream.backbone import WavLMBackbone
from adaltm_upstream.export import write_unilm_checkpoint

SAMPLE_RATE = 16000
WINDOW, HOP = 400, 320            # WavLM's CNN: a 25 ms receptive field every 20 ms


@dataclass(frozen=True)
class PretrainSettings:
    """Model size, units and schedule of the pretraining stage."""
    layers: int = 6                 # the defaults: the demo's base (6 layers -> 7 layer groups for λ)
    hidden: int = 128
    heads: int = 4
    ffn: int = 256
    conv_channels: int = 32
    normalize: bool = False         # False: loudness (part of the demo's emotions) stays visible to the model
    units: int = 64                 # k-means clusters = prediction targets
    prosody_weight: float = 3.0     # weight of the log-F0 and voicing dimensions in the k-means features
    steps: int = 600
    batch: int = 8
    lr: float = 2e-3
    warmup: float = 0.1             # fraction of the steps with a linearly rising learning rate
    mask_prob: float = 0.08         # probability that a frame starts a masked span (HuBERT: 0.08)
    mask_span: int = 5              # frames per span (HuBERT: 10, for utterances ten times longer)
    unmasked_weight: float = 0.5    # weight of the loss on unmasked frames (HuBERT: 0)
    save_every: int = 100
    seed: int = 0

    def check(self) -> None:
        positive = ("layers", "hidden", "heads", "ffn", "conv_channels", "units", "batch", "mask_span", "save_every")
        bad = [name for name in positive if getattr(self, name) < 1] + (["steps"] if self.steps < 0 else [])
        if bad:
            raise UserError(f"pretraining settings: {', '.join(bad)} must be at least 1 (steps: 0, a random base)")
        if self.hidden % self.heads or self.hidden % 16:
            raise UserError(f"pretraining settings: hidden ({self.hidden}) must be a multiple of heads "
                            f"({self.heads}) and of 16 (the positional convolution's groups)")
        if not 0 < self.mask_prob < 1 or not 0 <= self.warmup < 1:
            raise UserError("pretraining settings: mask_prob must be in (0, 1) and warmup in [0, 1)")


def wavlm_config(settings: PretrainSettings) -> WavLMConfig:
    """A pre-LN WavLM (as WavLM-Large) with a layer-norm CNN of WavLM's geometry: 20 ms frames, 25 ms window."""
    return WavLMConfig(hidden_size=settings.hidden, num_hidden_layers=settings.layers,
                       num_attention_heads=settings.heads, intermediate_size=settings.ffn,
                       conv_dim=(settings.conv_channels,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                       conv_stride=(5, 2, 2, 2, 2, 2, 2), feat_extract_norm="layer", do_stable_layer_norm=True,
                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16, hidden_dropout=0.1,
                       attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.0,
                       num_buckets=320, max_bucket_distance=800)


def split_audio(root: str | Path, split: str = "Train") -> list[Path]:
    """The audio files of one `Split_Set` of a corpus in the MSP-Podcast layout (labels are not read)."""
    root = Path(root)
    labels = root / "Labels" / "labels_consensus.csv"
    if not labels.exists():
        raise UserError(f"{labels}: not found (pretraining reads the file list of split {split} from it)")
    with open(labels, newline="") as handle:
        return [root / "Audios" / row["FileName"] for row in csv.DictReader(handle) if row["Split_Set"] == split]


# -- targets -----------------------------------------------------------------------------------------------------
def frame_count(samples: int) -> int:
    """Frames of WavLM's CNN for `samples` samples (its length arithmetic: 400-sample field, 320 hop)."""
    return max(0, 1 + (samples - WINDOW) // HOP)


def _log_f0(wav: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Autocorrelation pitch per frame (40 ms windows centred on the CNN's frames, 60-500 Hz): log F0 where
    voiced (normalised autocorrelation peak > 0.4), else 0; and the voicing flag."""
    size = 2 * HOP
    padded = F.pad(wav, ((size - WINDOW) // 2, size))
    frames_ = padded.unfold(0, size, HOP)[:frames]
    frames_ = frames_ - frames_.mean(dim=1, keepdim=True)
    power = torch.fft.rfft(frames_ * torch.hann_window(size), n=2 * size).abs() ** 2
    autocorr = torch.fft.irfft(power, n=2 * size)[:, :size]
    autocorr = autocorr / autocorr[:, :1].clamp(min=1e-8)
    shortest, longest = SAMPLE_RATE // 500, SAMPLE_RATE // 60
    peak, lag = autocorr[:, shortest:longest].max(dim=1)
    voiced = (peak > 0.4).float()
    return torch.log(SAMPLE_RATE / (lag + shortest).float()) * voiced, voiced


def frame_features(wav: torch.Tensor) -> torch.Tensor:
    """(frames, 41): 13 MFCCs (Kaldi's, c0 = log energy) with Δ and ΔΔ, log F0 and voicing, one row per CNN
    frame. `Units` standardises them and weights the two prosody columns by `prosody_weight`."""
    frames = frame_count(len(wav))
    if frames == 0:
        return torch.zeros(0, 41)
    mfcc = torchaudio.compliance.kaldi.mfcc(wav[None] * 32768, sample_frequency=SAMPLE_RATE, frame_length=25,
                                            frame_shift=20, num_ceps=13, dither=0.0, snip_edges=True)[:frames]
    delta = torchaudio.functional.compute_deltas(mfcc.T).T
    delta2 = torchaudio.functional.compute_deltas(delta.T).T
    log_f0, voiced = _log_f0(wav, frames)
    return torch.cat([mfcc, delta, delta2, log_f0[:, None], voiced[:, None]], dim=1)


@dataclass
class Units:
    """Standardisation and k-means centroids of the frame features; `assign` maps features to unit ids."""
    mean: torch.Tensor
    std: torch.Tensor
    scale: torch.Tensor
    centroids: torch.Tensor

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std * self.scale

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.standardise(features), self.centroids).argmin(dim=1)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 25) -> torch.Tensor:
    """Lloyd's algorithm from a k-means++ initialisation (Arthur & Vassilvitskii 2007); (k, D) centroids."""
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(k - 1):
        distance = torch.cdist(points, centroids).min(dim=1).values ** 2
        centroids = torch.cat([centroids, points[torch.multinomial(distance / distance.sum(), 1,
                                                                   generator=generator)]])
    for _ in range(iterations):
        nearest = torch.cdist(points, centroids).argmin(dim=1)
        members = F.one_hot(nearest, k).to(points.dtype)          # a matmul: far faster than index_add_ on CPU
        counts, sums = members.sum(dim=0), members.T @ points
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    return centroids


def fit_units(features: list[torch.Tensor], settings: PretrainSettings, max_points: int = 40000) -> Units:
    frames = torch.cat(features)
    if len(frames) < settings.units:
        raise UserError(f"pretraining: {len(frames)} frames of audio for {settings.units} units (need more audio)")
    mean, std = frames.mean(dim=0), frames.std(dim=0).clamp(min=1e-5)
    scale = torch.ones(frames.shape[1])
    scale[-2:] = settings.prosody_weight
    generator = torch.Generator().manual_seed(settings.seed)
    sample = frames[torch.randperm(len(frames), generator=generator)[:max_points]]
    centroids = kmeans((sample - mean) / std * scale, settings.units, generator)
    return Units(mean, std, scale, centroids)


# -- masked prediction -------------------------------------------------------------------------------------------
def span_mask(valid: torch.Tensor, prob: float, span: int, generator: torch.Generator) -> torch.Tensor:
    """HuBERT's masking: each valid frame starts a span of `span` frames with probability `prob`; spans are
    clipped to the utterance. At least one frame of the batch is masked."""
    starts = (torch.rand(valid.shape, generator=generator) < prob) & valid
    if not starts.any():
        first = int(valid.flatten().nonzero()[torch.randint(int(valid.sum()), (1,), generator=generator)])
        starts.view(-1)[first] = True
    mask = starts.clone()
    for offset in range(1, span):
        mask[:, offset:] |= starts[:, :-offset]
    return mask & valid


class MaskedPredictor(nn.Module):
    """The backbone the demo later loads (same forward, `WavLMBackbone`), with masking entering after the feature
    projection — where HuBERT and WavLM put their mask embedding — and a linear unit classifier on top."""

    def __init__(self, settings: PretrainSettings):
        super().__init__()
        self.backbone = WavLMBackbone(wavlm_config(settings), settings.normalize, "transformer")
        self.head = nn.Linear(settings.hidden, settings.units)
        self._mask: torch.Tensor | None = None
        self.backbone.model.feature_projection.register_forward_hook(self._apply_mask)

    def _apply_mask(self, module, inputs, output):
        if self._mask is None:
            return output
        hidden, *rest = output
        embedding = self.backbone.model.masked_spec_embed.to(hidden.dtype)
        return (torch.where(self._mask[..., None], embedding, hidden), *rest)

    def forward(self, wavs: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        self._mask = mask
        try:
            return self.head(self.backbone(wavs).hidden_states[-1])
        finally:
            self._mask = None


def _generator(settings: PretrainSettings, *stream: int) -> torch.Generator:
    """A generator for one (seed, purpose, step) triple: the run's randomness needs no saved RNG state."""
    seed = settings.seed
    for value in stream:
        seed = (seed * 1_000_003 + value) % (2 ** 63)
    return torch.Generator().manual_seed(seed)


def batch_indices(settings: PretrainSettings, count: int, step: int) -> list[int]:
    """Utterances of `step`: epochs of seeded permutations, batches never straddling two epochs."""
    per_epoch = max(1, count // settings.batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(count, generator=_generator(settings, 1, epoch))
    return order[position * settings.batch:(position + 1) * settings.batch].tolist()


def learning_rate_factor(settings: PretrainSettings, step: int) -> float:
    warmup = max(1, int(settings.warmup * settings.steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))


def train_step(model: MaskedPredictor, optimizer: torch.optim.Optimizer, settings: PretrainSettings, step: int,
               wavs: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[float, float]:
    """One update; returns (loss, accuracy on masked frames)."""
    frames = max(frame_count(len(w)) for w in wavs)
    padded = torch.full((len(wavs), frames), -1)
    for row, target in enumerate(targets):
        padded[row, :len(target)] = target
    valid = padded >= 0
    mask = span_mask(valid, settings.mask_prob, settings.mask_span, _generator(settings, 2, step))
    torch.manual_seed(_generator(settings, 3, step).initial_seed())      # dropout
    logits = model(wavs, mask)
    loss = F.cross_entropy(logits[mask], padded[mask])
    unmasked = valid & ~mask
    if settings.unmasked_weight and unmasked.any():
        loss = loss + settings.unmasked_weight * F.cross_entropy(logits[unmasked], padded[unmasked])
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * learning_rate_factor(settings, step)
    optimizer.step()
    accuracy = (logits[mask].argmax(dim=-1) == padded[mask]).float().mean()
    return float(loss.detach()), float(accuracy)


def _load_state(path: Path, settings: PretrainSettings, model: nn.Module, optimizer) -> int:
    """The step to continue from: 0 without a state file, else the saved one (settings must match)."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != dataclasses.asdict(settings):
        raise UserError(f"{path}: pretraining state written with other settings; delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def pretrain(audio: list[Path], out: str | Path, work: str | Path,
             settings: PretrainSettings = PretrainSettings()) -> Path:
    """Pretrain on `audio` and write the base to `out` (unilm format). `work` holds the resumable state: a rerun
    after an interruption continues from its last save."""
    settings.check()
    if not audio:
        raise UserError("pretraining: no audio files given")
    out, work = Path(out), Path(work)
    wavs = [load_mono_16k(path) for path in audio]
    short = [str(p) for p, w in zip(audio, wavs) if frame_count(len(w)) == 0]
    if short:
        raise UserError(f"{short[0]}: shorter than one 25 ms frame ({len(short)} such files)")
    features = [frame_features(F.layer_norm(w, w.shape) if settings.normalize else w) for w in wavs]
    units = fit_units(features, settings)
    targets = [units.assign(f) for f in features]

    torch.manual_seed(settings.seed)
    model = MaskedPredictor(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01,
                                  foreach=True)   # on CPU: 3x faster than the per-tensor loop (and than fused)
    state_path = work / "pretrain-state.ckpt"
    start = _load_state(state_path, settings, model, optimizer)
    model.train()
    progress = tqdm(total=settings.steps, initial=start, desc="pretrain", unit="step", file=sys.stderr,
                    dynamic_ncols=True)
    for step in range(start, settings.steps):
        chosen = batch_indices(settings, len(wavs), step)
        loss, accuracy = train_step(model, optimizer, settings, step, [wavs[i] for i in chosen],
                                    [targets[i] for i in chosen])
        progress.set_postfix(loss=f"{loss:.3f}", masked_acc=f"{accuracy:.3f}")
        progress.update(1)
        if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
            atomic_torch_save({"step": step + 1, "settings": dataclasses.asdict(settings),
                               "model": model.state_dict(), "optimizer": optimizer.state_dict()}, state_path)
    progress.close()
    backbone = model.backbone
    provenance = {"objective": "masked prediction of k-means units (MFCC + log F0)", "files": len(audio),
                  "settings": dataclasses.asdict(settings)}
    return write_unilm_checkpoint(out, backbone.config, settings.normalize, backbone.model.state_dict(),
                                  adaltm_pretraining=provenance)
