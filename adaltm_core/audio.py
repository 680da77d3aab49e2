"""Audio in: soundfile for decoding, torchaudio for resampling, every failure named with its file."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from adaltm_core.errors import UserError

SAMPLE_RATE = 16000


class AudioError(UserError):
    """A file that cannot serve as 16 kHz speech; the message names the file."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    num_frames: int
    num_channels: int
    bits_per_sample: int
    encoding: str


def info(path: str | os.PathLike) -> AudioInfo:
    """Header-only metadata (what `torchaudio.info` returned), cheap enough to validate a whole corpus."""
    try:
        meta = sf.info(str(path))
    except Exception as error:  # soundfile raises several types for unreadable files
        raise AudioError(f"{path}: unreadable audio ({_short(error)})") from None
    bits = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "PCM_U8": 8, "PCM_S8": 8, "FLOAT": 32, "DOUBLE": 64}
    return AudioInfo(meta.samplerate, meta.frames, meta.channels, bits.get(meta.subtype, 0), meta.subtype)


def read_frames(path, frame_offset: int = 0, num_frames: int = -1) -> tuple[torch.Tensor, int]:
    """(channels, frames) float32 in [-1, 1] and the file's sample rate."""
    try:
        data, sr = sf.read(path if hasattr(path, "read") else str(path), start=frame_offset,
                           frames=num_frames, dtype="float32", always_2d=True)
    except Exception as error:
        raise AudioError(f"{path}: unreadable audio ({_short(error)})") from None
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr


def load_mono_16k(path: str | os.PathLike, crop_seconds: float | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A 1-D 16 kHz waveform: channels averaged, resampled when needed, optionally a random crop."""
    wav, sr = read_frames(path)
    if wav.numel() == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    wav = wav.mean(dim=0)
    if sr != SAMPLE_RATE:
        wav = AF.resample(wav, sr, SAMPLE_RATE)
    if not torch.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN or Inf samples")
    if crop_seconds is not None:
        limit = int(crop_seconds * SAMPLE_RATE)
        if wav.numel() > limit:
            start = int(torch.randint(0, wav.numel() - limit + 1, (1,), generator=generator))
            wav = wav[start:start + limit]
    return wav


def _short(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
