"""vox-profile checkpoints (the paper's SER model) as users download them, in every fine-tuning mode of its
`WavLMWrapper`: LoRA folded exactly as loralib's eval mode merges it, a frozen backbone reported as such, heads
listed as dropped.

The oracle is loralib itself (`Linear.train(False)` merges the factors). The default test rebuilds what
`WavLMWrapper.__init__` (hyperion-voxprofile 0.1.0, vox_profile/model/emotion/wavlm_emotion.py) does to its
backbone with real `loralib.Linear` layers; `test_real_wavlm_wrapper` uses vox-profile's own class when it is
importable (it pins transformers<5 and numpy<2, so it is not part of the test extra: install it with
`pip install --no-deps hyperion-voxprofile==0.1.0`).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file
from transformers import WavLMConfig, WavLMModel

from adaltm_cli.main import main as cli
from adaltm_upstream import task_vectors
from adaltm_upstream.checkpoints import load_checkpoint

loralib = pytest.importorskip("loralib")

# pre-LN like WavLM-Large; 4 layers -> LoRA on layer 3 (index > 4 // 2); 800: what the reader assumes without a
# WavLM config (vox-profile files carry none)
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, conv_dim=[16, 16, 16],
            conv_kernel=[10, 3, 3], conv_stride=[5, 2, 2], conv_bias=False, feat_extract_norm="layer",
            do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
            max_bucket_distance=800)
RANK = 4
MODES = {  # mode -> WavLMWrapper constructor arguments
    "lora": dict(finetune_method="lora", freeze_params=True),            # the class defaults: LoRA factors train
    "lora_unfrozen": dict(finetune_method="lora", freeze_params=False),  # LoRA and every backbone weight
    "finetune": dict(finetune_method="finetune", freeze_params=False),   # full fine-tuning
    "frozen": dict(finetune_method="finetune", freeze_params=True),      # heads only (categorical emotion)
    "combined_frozen": dict(finetune_method="combined", freeze_params=True),  # LoRA layers, factors frozen too
}
HEADS = {"weights": (5,), "model_seq.0.weight": (16, 32, 1), "emotion_layer.0.weight": (16, 16),
         "emotion_layer.2.weight": (9, 16), "arousal_layer.0.weight": (1, 16)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The stand-in for microsoft/wavlm-large, as a transformers directory."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vox") / "base"
    WavLMModel(WavLMConfig(**TINY)).save_pretrained(path)
    return path


def wrapper_backbone(base_dir: Path, finetune_method: str, freeze_params: bool) -> WavLMModel:
    """WavLMWrapper's backbone as its __init__ builds it: the pretrained WavLM; for "lora"/"combined" the
    feed-forward linears of layers with index > L // 2 become `loralib.Linear(in, out, r=lora_rank)` (pretrained
    weights reloaded with strict=False); then its requires_grad rules."""
    model = WavLMModel.from_pretrained(base_dir)
    pretrained = model.state_dict()
    if finetune_method in ("lora", "combined"):
        for index, layer in enumerate(model.encoder.layers):
            if index > model.config.num_hidden_layers // 2:
                hidden, ffn = model.config.hidden_size, model.config.intermediate_size
                layer.feed_forward.intermediate_dense = loralib.Linear(hidden, ffn, r=RANK)
                layer.feed_forward.output_dense = loralib.Linear(ffn, hidden, r=RANK)
        model.load_state_dict(pretrained, strict=False)
    for name, parameter in model.named_parameters():
        if freeze_params and finetune_method != "lora":
            parameter.requires_grad = False
        elif freeze_params:
            parameter.requires_grad = name not in pretrained
        else:
            parameter.requires_grad = True
    return model


def train(model: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter the mode trains moves (lora_B leaves zero, so its product is no longer zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def save_like_hub_mixin(model: torch.nn.Module, directory: Path, arguments: dict) -> Path:
    """PyTorchModelHubMixin.save_pretrained of WavLMWrapper: the state dict as it is (train mode: factors not
    merged) with the backbone under `backbone_model.`, its heads beside it; config.json = the constructor's
    arguments over its defaults."""
    directory.mkdir(parents=True)
    state = {f"backbone_model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update({k: torch.randn(shape) for k, shape in HEADS.items()})
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    defaults = {"detailed_class_num": 17, "finetune_method": "lora", "freeze_params": True, "hidden_dim": 256,
                "lora_rank": 16, "output_class_num": 9, "pretrain_model": "wavlm_large", "use_conv_output": True}
    config = {**defaults, **arguments, "lora_rank": RANK}
    (directory / "config.json").write_text(json.dumps(config, sort_keys=True))
    return directory


def assert_reads_as(directory: Path, merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> int:
    """Our reader's weights equal the eval-mode (merged) weights bit for bit; returns how many differ from base."""
    ours = load_checkpoint(directory).state
    expected = {k: v for k, v in merged.items() if not k.endswith(("lora_A", "lora_B"))}
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    return sum(not torch.equal(expected[k], base[k]) for k in expected)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_reads_as_loralib_eval_mode_merges_it(base_dir, tmp_path, mode):
    model = wrapper_backbone(base_dir, **MODES[mode])
    train(model)
    directory = save_like_hub_mixin(model, tmp_path / mode, MODES[mode])
    model.eval()  # loralib merges B·A·alpha/r into the weight here
    base = WavLMModel.from_pretrained(base_dir).state_dict()
    changed = assert_reads_as(directory, model.state_dict(), base)
    lora_layer_weights = 2  # intermediate_dense and output_dense of layer 3
    assert changed == {"lora": lora_layer_weights, "lora_unfrozen": len(base), "finetune": len(base),
                       "frozen": 0, "combined_frozen": 0}[mode]


def test_frozen_backbone_vector_is_zero_and_says_why(base_dir, tmp_path, capsys):
    frozen = wrapper_backbone(base_dir, **MODES["frozen"])
    directory = save_like_hub_mixin(frozen, tmp_path / "frozen", MODES["frozen"])
    out = tmp_path / "ser.safetensors"
    cli(["task-vector", "extract", "--base", str(base_dir), "--finetuned", str(directory), "-o", str(out)])
    captured = capsys.readouterr()
    assert "freeze_params=true" in captured.err and "ZERO" in captured.err
    assert all(k in captured.out for k in HEADS)  # the dropped heads are listed
    assert "freeze_params=true" in task_vectors.load(out).meta["zero_reason"]
    cli(["task-vector", "inspect", str(out)])
    assert "freeze_params=true" in capsys.readouterr().err


def test_lora_extract_reports_the_fold(base_dir, tmp_path, capsys):
    model = wrapper_backbone(base_dir, **MODES["lora"])
    train(model)
    directory = save_like_hub_mixin(model, tmp_path / "lora", MODES["lora"])
    out = tmp_path / "ser.safetensors"
    cli(["task-vector", "extract", "--base", str(base_dir), "--finetuned", str(directory), "-o", str(out)])
    captured = capsys.readouterr()
    assert "folded 2 loralib LoRA pairs" in captured.out and "ZERO" not in captured.err
    report = task_vectors.inspect([task_vectors.load(out)])[0]
    assert report["zero_groups"] == [0, 1, 2, 3]  # only layer 3 (group 4, the last) was trained


def test_lora_rank_that_contradicts_config_is_refused(base_dir, tmp_path, capsys):
    model = wrapper_backbone(base_dir, **MODES["lora"])
    directory = save_like_hub_mixin(model, tmp_path / "lora", MODES["lora"])
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "lora_rank": 8}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(["task-vector", "extract", "--base", str(base_dir), "--finetuned", str(directory), "-o",
             str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "lora_rank=8" in err[0] and str(directory) in err[0]


@pytest.mark.parametrize("mode", list(MODES))
def test_real_wavlm_wrapper(base_dir, tmp_path, mode):
    """vox-profile's own class: constructed offline (its two hub downloads read the tiny base), saved with its
    own save_pretrained, reloaded with its own from_pretrained (which ends in eval(): LoRA merged)."""
    wavlm_emotion = pytest.importorskip("vox_profile.model.emotion.wavlm_emotion")
    from transformers import Wav2Vec2FeatureExtractor

    class LocalWavLM:
        @staticmethod
        def from_pretrained(_name, **kwargs):
            return WavLMModel.from_pretrained(base_dir, **kwargs)

    class LocalExtractor:
        @staticmethod
        def from_pretrained(_name, **kwargs):
            return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True)

    with mock.patch.object(wavlm_emotion, "WavLMModel", LocalWavLM), \
            mock.patch.object(wavlm_emotion, "Wav2Vec2FeatureExtractor", LocalExtractor):
        model = wavlm_emotion.WavLMWrapper(pretrain_model="wavlm_large", lora_rank=RANK, output_class_num=9,
                                           **MODES[mode])
        train(model)
        model.save_pretrained(tmp_path / mode)
        reloaded = wavlm_emotion.WavLMWrapper.from_pretrained(str(tmp_path / mode))
    merged = {k.removeprefix("backbone_model."): v for k, v in reloaded.state_dict().items()
              if k.startswith("backbone_model.")}
    base = WavLMModel.from_pretrained(base_dir).state_dict()
    changed = assert_reads_as(tmp_path / mode, merged, base)
    assert (changed == 0) == (mode in ("frozen", "combined_frozen"))
