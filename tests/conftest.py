"""Shared fixtures: tiny WavLM checkpoints written by the real libraries, and the launcher in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# s3prl's unilm WavLM, shrunk: 2 layers, 64 wide, a 7-layer CNN with 32 channels (same strides as Large).
TINY_UNILM_CFG = dict(
    extractor_mode="layer_norm", encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
    encoder_attention_heads=4, conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
    layer_norm_first=True, conv_bias=False, relative_position_embedding=True, num_buckets=320,
    max_distance=800, gru_rel_pos=True, normalize=True, conv_pos=16, conv_pos_groups=4,
)


def write_unilm_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A `{'cfg', 'model'}` file exactly as microsoft/unilm and s3prl's `wavlm_local` expect."""
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    cfg = {**TINY_UNILM_CFG, **overrides}
    torch.manual_seed(seed)
    model = WavLM(WavLMConfig(cfg))
    with torch.no_grad():  # make every parameter non-trivial (LayerNorms start at 1/0, grep_a at 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save({"cfg": cfg, "model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def tiny_unilm(tmp_path_factory) -> Path:
    return write_unilm_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_wavlm.pt")


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    return env


# Two local ranks on a free port, as users start DDP.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_bounded(command: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` that, on timeout, kills the command's whole process group: torchrun's ranks included."""
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"still running after {timeout} s: {' '.join(command)}\n{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_launcher(args: list[str], cwd: Path, timeout: int = 300, check: bool = True,
                 runner: list[str] | None = None) -> subprocess.CompletedProcess:
    """The real `run_downstream.py`, as a user runs it."""
    command = (runner or [sys.executable]) + [str(ROOT / "run_downstream.py"), *args]
    result = run_bounded(command, timeout, cwd=cwd, env=launcher_env())
    if check and result.returncode != 0:
        raise AssertionError(f"launcher failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def example_config(total_steps: int = 4) -> dict:
    """A config for s3prl's stock `example` downstream (the sdist ships none)."""
    return {
        "runner": {"total_steps": total_steps, "gradient_clipping": 1.0, "gradient_accumulate_steps": 1,
                   "log_step": 2, "eval_step": total_steps, "save_step": 2, "max_keep": 2,
                   "eval_dataloaders": ["dev"], "evaluate_ratio": 0.02},
        "optimizer": {"name": "TorchOptim", "torch_optim_name": "Adam", "lr": 1.0e-3},
        "downstream_expert": {"datarc": {"num_workers": 0, "train_batch_size": 2, "eval_batch_size": 2},
                              "modelrc": {"input_dim": 16}},
    }


def write_task_vector(base_path: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A genuine τ file: a perturbed copy of the base saved as a checkpoint, then `extract`."""
    from adaltm_upstream import task_vectors
    from adaltm_upstream.checkpoints import load_checkpoint
    from tests.formats import write_hf_model

    finetuned = load_checkpoint(base_path)
    generator = torch.Generator().manual_seed(seed)
    finetuned.state = {k: v + scale * torch.randn(v.shape, generator=generator) * (v.std() + 0.1)
                       for k, v in finetuned.state.items()}
    ft_dir = write_hf_model(finetuned, out.parent / f"{out.stem}_model")
    tensors, meta = task_vectors.extract(base_path, ft_dir)
    task_vectors.save(out, tensors, meta)
    return out


@pytest.fixture(scope="session")
def merge_setup(tmp_path_factory, tiny_unilm):
    """A base and two task vectors (asr, ser) extracted from it."""
    root = tmp_path_factory.mktemp("vectors")
    return {"base": tiny_unilm, "asr": write_task_vector(tiny_unilm, root / "asr.safetensors", seed=1),
            "ser": write_task_vector(tiny_unilm, root / "ser.safetensors", seed=2)}


@pytest.fixture(scope="session")
def mini_msp(tmp_path_factory):
    """A generated miniature MSP-Podcast release, shared by the downstream tests: (root, facts)."""
    from tests.corpus_factory import write_mini_msp

    root = tmp_path_factory.mktemp("msp") / "MSP-Podcast"
    return root, write_mini_msp(root)


@pytest.fixture
def tensors():
    """Plain named tensors for merge unit tests: a base, two vectors (the second lacks "b"), two groups."""
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g), "c": torch.randn(3, generator=g)}
    asr = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    ser = {"a": torch.randn(2, 3, generator=g), "c": torch.randn(3, generator=g)}  # no "b": τ_ser(b) = 0
    return base, [asr, ser], [["a", "b"], ["c"]]


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 16 KiB tmpfs: a real full disk (ENOSPC as the kernel gives it). Mounting needs root (as
    `make test` has, to install espeak-ng and sox); without it, the test is skipped with the reason."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def build_merge(base, vectors, groups, granularity, init, frozen_groups=frozenset(), constraints=(), ops=(),
                tasks=None):
    """`GroupedMerge` over plain named tensors, its vector operations fitted as the upstream fits them."""
    from adaltm_upstream import lambdas
    from adaltm_upstream.merging import GroupedMerge
    from adaltm_upstream.methods.pipeline import VectorPipeline

    tasks = tasks or [f"t{t}" for t in range(len(vectors))]
    pipeline = VectorPipeline.fit(ops, vectors, tasks, [name for names in groups for name in names])
    return GroupedMerge(base, pipeline, groups, lambdas.table(granularity, groups, frozenset(frozen_groups)), init,
                        constraints)


@pytest.fixture(autouse=True)
def _torch_modes_restored():
    """A test that leaves autograd off (once: a failed `adaltm export`, whose generator was suspended inside
    `torch.no_grad()`) would fail every later gradient test far from its cause: fail it here instead."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left torch's autograd disabled"
