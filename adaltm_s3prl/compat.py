"""Fixes that let s3prl 0.4.18 run on the modern stack without editing its installed files.

Each fix is one function that says what it repairs, checks whether the installed library still needs it
and does nothing otherwise. `apply_all()` must run before `import s3prl.hub` (the launcher does that).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adaltm_core.files import atomic_torch_save


@dataclass(frozen=True)
class Fix:
    name: str
    fixes: str
    apply: Callable[[], bool]  # returns True when something was patched


def _torchaudio_set_audio_backend() -> bool:
    """torchaudio >= 2.9 removed `set_audio_backend`; s3prl calls it at import time (hub.py via byol_s,
    run_downstream.main). Backends no longer exist, so a no-op is the faithful replacement."""
    import torchaudio

    if hasattr(torchaudio, "set_audio_backend"):
        return False
    torchaudio.set_audio_backend = lambda backend=None: None
    torchaudio.get_audio_backend = lambda: "soundfile"
    return True


def _torchaudio_sox_effects() -> bool:
    """torchaudio >= 2.9 removed `torchaudio.sox_effects`; `s3prl.upstream.mos_prediction.expert` imports it at
    module level (which breaks `import s3prl.hub`) and several stock downstreams read audio with it. The
    replacement runs the same effect chains through the `sox` program (`adaltm_s3prl.sox_effects`)."""
    import torchaudio

    try:
        import torchaudio.sox_effects  # noqa: F401

        return False
    except ImportError:
        pass
    from adaltm_s3prl import sox_effects

    sys.modules["torchaudio.sox_effects"] = sox_effects
    torchaudio.sox_effects = sox_effects
    return True


def _torchaudio_load_via_soundfile() -> bool:
    """torchaudio >= 2.9 decodes through torchcodec + FFmpeg, which are not installed with it; s3prl's runner
    (`-m inference`) and its datasets call `torchaudio.load`/`torchaudio.info`. soundfile reads the same files."""
    import torchaudio

    if getattr(torchaudio.load, "_adaltm_soundfile", False):
        return False
    try:
        import torchcodec  # noqa: F401

        return False
    except ImportError:
        pass
    from adaltm_core import audio

    def load(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True,
             channels_first: bool = True, **_ignored):
        wav, sr = audio.read_frames(uri, frame_offset, num_frames)
        return (wav if channels_first else wav.T), sr

    load._adaltm_soundfile = True
    torchaudio.load = load
    torchaudio.info = audio.info
    return True


def _huggingface_hub_removed_names() -> bool:
    """huggingface_hub 1.0 removed `HfFolder` and `Repository`; s3prl imports both at module level in
    run_downstream.py and downstream/runner.py. Token storage maps onto the current API; the git-based
    `Repository` (used only by `--push_to_hf_hub`) gets a stand-in that explains itself when used."""
    import huggingface_hub

    patched = False
    if not hasattr(huggingface_hub, "HfFolder"):
        class HfFolder:
            @staticmethod
            def get_token():
                return huggingface_hub.get_token()

            @staticmethod
            def save_token(token):
                huggingface_hub.login(token=token, add_to_git_credential=False)

        huggingface_hub.HfFolder = HfFolder
        patched = True
    if not hasattr(huggingface_hub, "Repository"):
        class Repository:
            def __init__(self, *_args, **_kwargs):
                raise RuntimeError("huggingface_hub>=1.0 removed Repository; --push_to_hf_hub is unavailable, "
                                   "upload the experiment directory with `hf upload` instead")

        huggingface_hub.Repository = Repository
        patched = True
    return patched


def _weights_only_resume() -> bool:
    """torch >= 2.6 loads with `weights_only=True`; s3prl's `states-*.ckpt` holds the run's `argparse.Namespace`,
    so `-e`/`-i` fail. Allow-listing exactly that class keeps untrusted pickle code out."""
    if not hasattr(torch.serialization, "add_safe_globals"):
        return False
    if argparse.Namespace in torch.serialization.get_safe_globals():
        return False
    torch.serialization.add_safe_globals([argparse.Namespace])
    return True


# Old `states-*.ckpt` the runner asked to delete, kept until a new one is safely on disk.
_DEFERRED_REMOVALS: list[str] = []


def atomic_save(obj, path) -> None:
    """The runner's `torch.save`, atomic for paths (file objects are written as s3prl wrote them); once a new
    `states-*.ckpt` is on disk, the old ones the rotation asked to delete are deleted."""
    if not isinstance(path, (str, os.PathLike)):
        torch.save(obj, path)
        return
    atomic_torch_save(obj, path)
    if os.path.basename(path).startswith("states-"):
        while _DEFERRED_REMOVALS:
            old = _DEFERRED_REMOVALS.pop()
            if os.path.exists(old):
                os.remove(old)


def _remove_after_next_save(path) -> None:
    if os.path.basename(path).startswith("states-"):
        _DEFERRED_REMOVALS.append(os.fspath(path))
    else:
        os.remove(path)


def _proxy(module: types.ModuleType, **overrides) -> types.ModuleType:
    """A stand-in for `module` inside ONE s3prl module's namespace: `overrides` replace attributes, everything else
    is the real module's. Other code, ours included, keeps seeing the real module."""

    class Proxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(module, name)

    proxy = Proxy(module.__name__)
    proxy.__dict__.update(overrides, _adaltm_proxy=True)
    return proxy


def _atomic_runner_checkpoints() -> bool:
    """s3prl's runner writes `states-*.ckpt` and `dev-best.ckpt` with a plain `torch.save`; a crash mid-write
    destroys the previous best checkpoint. Only the runner's own `torch.save` is redirected."""
    from s3prl.downstream import runner

    if getattr(runner.torch, "_adaltm_proxy", False):
        return False
    runner.torch = _proxy(torch, save=atomic_save)
    return True


def _rotation_after_save() -> bool:
    """With `runner.max_keep`, s3prl deletes the oldest `states-*.ckpt` BEFORE writing the new one: a kill or a full
    disk in between leaves no checkpoint at all (with max_keep 1). In the runner's namespace only, those deletions
    wait until the new checkpoint is safely written (`atomic_save`)."""
    from s3prl.downstream import runner

    if getattr(runner.os, "_adaltm_proxy", False):
        return False
    runner.os = _proxy(os, remove=_remove_after_next_save)
    return True


def _set_device_without_cuda() -> bool:
    """s3prl's `main()` calls `torch.cuda.set_device(local_rank)` for every distributed run, which fails for CPU
    (gloo) DDP on a machine without CUDA. In `run_downstream`'s namespace only, it is skipped when no CUDA device
    exists; with CUDA it runs as before."""
    from s3prl import run_downstream

    if getattr(run_downstream.torch, "_adaltm_proxy", False):
        return False

    def set_device(device) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_device(device)

    run_downstream.torch = _proxy(torch, cuda=_proxy(torch.cuda, set_device=set_device))
    return True


def _ddp_non_leader_step_counter() -> bool:
    """Under DDP, s3prl's runner `continue`s on ranks > 0 before `pbar.update(1)`, so those ranks never reach
    `total_steps`: they keep training after rank 0 has finished and die when it exits. Here the non-leader
    progress bar advances at each `optimizer.zero_grad()` of the training loop, which is exactly where the
    leader's step ends. On a single process (or rank 0) nothing changes."""
    from s3prl.downstream import runner

    if getattr(runner.get_optimizer, "_adaltm_counts_steps", False):
        return False
    from s3prl.utility.helper import is_leader_process

    make_bar, make_optimizer = runner.tqdm, runner.get_optimizer
    non_leader_bars: list = []

    class TqdmTrackingOverall(make_bar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("desc") == "overall" and not is_leader_process():
                non_leader_bars[:] = [self]

    def optimizer_counting_steps(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        if not is_leader_process():
            zero_grad = optimizer.zero_grad

            def zero_grad_and_count(*zargs, **zkwargs):
                zero_grad(*zargs, **zkwargs)
                for bar in non_leader_bars:
                    bar.update(1)

            optimizer.zero_grad = zero_grad_and_count
        return optimizer

    optimizer_counting_steps._adaltm_counts_steps = True
    runner.tqdm, runner.get_optimizer = TqdmTrackingOverall, optimizer_counting_steps
    return True


def _records_through_ddp() -> bool:
    """s3prl's `main()` calls `hack_isinstance()`, which makes every defaultdict stop being a dict for the whole
    process (and wraps `isinstance` once more per call). Its purpose: GPU DDP moves forward arguments to the
    device and rebuilds each dict (`type(obj)(items)`), which fails for the runner's `records` defaultdict — and
    would hand the downstream a copy, losing what it logs. The side effect broke sympy (`DomainMatrix` checks
    for dicts), so `torch.compile` (inductor) failed inside the launcher. Here the hack is skipped and DDP's mover
    alone hands defaultdict arguments over untouched."""
    from s3prl import run_downstream
    from torch.nn.parallel import distributed

    if getattr(distributed._to_kwargs, "_adaltm_records", False):
        return False
    move = distributed._to_kwargs

    def to_kwargs(inputs, kwargs, target_device, use_side_stream_for_tensor_copies):
        kept = {k: v for k, v in (kwargs or {}).items() if isinstance(v, defaultdict)}
        rest = {k: v for k, v in (kwargs or {}).items() if k not in kept}
        moved_inputs, moved_kwargs = move(inputs, rest, target_device, use_side_stream_for_tensor_copies)
        moved_inputs, moved_kwargs = moved_inputs or ((),), moved_kwargs or ({},)
        return moved_inputs, tuple({**moved, **kept} for moved in moved_kwargs)

    to_kwargs._adaltm_records = True
    distributed._to_kwargs = to_kwargs
    run_downstream.hack_isinstance = lambda: None
    return True


def _ddp_wrapper() -> bool:
    """s3prl wraps trainable modules in DDP with `device_ids=[local_rank]` (invalid for CPU modules) and the
    default `broadcast_buffers=True`: buffers are re-sent every forward, and since only rank 0 evaluates,
    its evaluation forward waits for a broadcast no other rank joins. Buffers hold no trained state here
    (frozen weights, running scores), so they are not broadcast."""
    from s3prl.downstream import runner

    if getattr(runner.DDP, "_adaltm_wrapper", False):
        return False
    ddp = runner.DDP

    def wrap(module, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        kwargs.setdefault("broadcast_buffers", False)
        return ddp(module, device_ids=None if on_cpu else device_ids, **kwargs)

    wrap._adaltm_wrapper = True
    runner.DDP = wrap
    return True


def _cache_beside_voxceleb1_lists(module: types.ModuleType, cache: Path) -> None:
    module.CACHE_PATH = f"{cache}{os.sep}"  # read as os.path.join(CACHE_PATH, f"{mode}.pkl") at each construction


def _cache_beside_sv_voxceleb1_lengths(module: types.ModuleType, cache: Path) -> None:
    module.__file__ = str(cache / "dataset.py")  # its length cache is os.path.dirname(__file__)/.wav_lengths


# Stock downstreams whose dataset module caches into s3prl's package directory, and how to move that cache.
PACKAGE_DIR_CACHES: dict[str, Callable[[types.ModuleType, Path], None]] = {
    "voxceleb1": _cache_beside_voxceleb1_lists,
    "sv_voxceleb1": _cache_beside_sv_voxceleb1_lengths,
}


def _downstream_caches_in_expdir() -> bool:
    """voxceleb1 (`.cache/{train,dev,test}.pkl`, the file lists) and sv_voxceleb1 (`.wav_lengths/`) cache inside
    s3prl's installed package: a read-only or shared site-packages breaks, and voxceleb1's cache is keyed by
    the split alone, so a second data root silently reuses the first root's file lists. Each run caches in
    `<expdir>/<downstream>-cache/` instead; other downstreams are untouched."""
    from s3prl.downstream.runner import Runner

    if getattr(Runner._get_downstream, "_adaltm_cache", False):
        return False
    get_downstream = Runner._get_downstream

    def wrapped(runner):
        move = PACKAGE_DIR_CACHES.get(runner.args.downstream)
        if move is not None:
            module = importlib.import_module(f"s3prl.downstream.{runner.args.downstream}.dataset")
            cache = Path(runner.args.expdir).resolve() / f"{runner.args.downstream}-cache"
            cache.mkdir(parents=True, exist_ok=True)
            move(module, cache)
        return get_downstream(runner)

    wrapped._adaltm_cache = True
    Runner._get_downstream = wrapped
    return True


FIXES: tuple[Fix, ...] = (
    Fix("torchaudio.set_audio_backend", "import s3prl.hub and run_downstream.main", _torchaudio_set_audio_backend),
    Fix("torchaudio.sox_effects", "import s3prl.hub (mos_prediction)", _torchaudio_sox_effects),
    Fix("torchaudio.load", "audio loading without torchcodec/FFmpeg", _torchaudio_load_via_soundfile),
    Fix("huggingface_hub.HfFolder/Repository", "import run_downstream and runner", _huggingface_hub_removed_names),
    Fix("torch.load weights_only", "-e/-i resume of states-*.ckpt", _weights_only_resume),
)

# Needs s3prl's runner importable, so it runs after the fixes above.
LATE_FIXES: tuple[Fix, ...] = (
    Fix("atomic checkpoints", "states-*.ckpt written atomically", _atomic_runner_checkpoints),
    Fix("rotation after save", "max_keep never deletes the last checkpoint first", _rotation_after_save),
    Fix("DDP step counter", "ranks > 0 stop at total_steps", _ddp_non_leader_step_counter),
    Fix("DDP wrapper", "CPU modules and rank-0-only evaluation under DDP", _ddp_wrapper),
    Fix("records through DDP", "s3prl's process-wide isinstance hack (breaks torch.compile)", _records_through_ddp),
    Fix("cuda.set_device without CUDA", "CPU (gloo) DDP under torchrun", _set_device_without_cuda),
    Fix("package-directory caches", "voxceleb1/sv_voxceleb1 cache in the experiment", _downstream_caches_in_expdir),
)


def apply_all() -> list[str]:
    """Apply every fix; returns the names of those that were needed here."""
    applied = [fix.name for fix in FIXES if fix.apply()]
    applied += [fix.name for fix in LATE_FIXES if fix.apply()]
    return applied
