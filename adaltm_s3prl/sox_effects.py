"""`torchaudio.sox_effects` as s3prl's stock downstreams call it, through the `sox` command-line tool.

torchaudio 2.9 removed its libsox binding; speech_commands, sv_voxceleb1, mos_prediction, quesst14 and sws2013
read every utterance with `apply_effects_file(path, [["channels", "1"], ["rate", "16000"], ...])`. The chains
are sox's own effect syntax, so the `sox` program (Debian package `sox`, which `make` installs) applies them
with the same meaning. Output is 32-bit float, so nothing is dithered or clipped on the way back.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import soundfile as sf
import torch


def _sox(inputs: list[str], effects: list[list[str]], stdin: bytes | None = None) -> tuple[torch.Tensor, int]:
    program = shutil.which("sox")
    if program is None:
        raise RuntimeError("sox: not installed; s3prl's torchaudio.sox_effects calls need it "
                           "(apt-get install sox, or `make setup`)")
    command = [program, "-q", *inputs, "-t", "wav", "-e", "floating-point", "-b", "32", "-",
               *(str(part) for effect in effects for part in effect)]
    done = subprocess.run(command, input=stdin, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"sox failed on {inputs[-1]} with effects {effects}: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    samples, sample_rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
    return torch.from_numpy(samples.T.copy()), sample_rate


def apply_effects_file(path: str | os.PathLike, effects: list[list[str]], normalize: bool = True,
                       channels_first: bool = True, format: str | None = None) -> tuple[torch.Tensor, int]:
    """Decode `path`, apply the sox effect chain; (channels, frames) float32 in [-1, 1] and the sample rate."""
    inputs = (["-t", format] if format else []) + [os.fspath(path)]
    wav, sample_rate = _sox(inputs, effects)
    return (wav if channels_first else wav.T), sample_rate


def apply_effects_tensor(tensor: torch.Tensor, sample_rate: int, effects: list[list[str]],
                         channels_first: bool = True) -> tuple[torch.Tensor, int]:
    """The same for audio already in memory (sent to sox as a 32-bit float WAV)."""
    samples = tensor.detach().cpu().float().numpy()
    samples = samples.T if channels_first else samples
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="FLOAT")
    wav, out_rate = _sox(["-t", "wav", "-"], effects, stdin=buffer.getvalue())
    return (wav if channels_first else wav.T), out_rate
