"""Task vectors: extraction recovers a known delta across formats; inspect reports norms, ranks, zeros."""

from __future__ import annotations

import json
import re

import pytest
import torch

from adaltm_cli import main as cli
from adaltm_upstream import task_vectors
from adaltm_upstream.checkpoints import load_checkpoint
from tests.conftest import write_unilm_checkpoint
from tests.formats import write_hf_model, write_s3prl_states, write_vox_profile

# group -> scale of the delta put into that group (group 0 untouched)
DELTA_SCALE = {1: 1e-3, 2: 5e-3}


def _group(name: str) -> int:
    match = re.match(r"encoder\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 2 if name.startswith("encoder.layer_norm") else 0  # pre-LN: final norm joins the last layer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    base_path = write_unilm_checkpoint(root / "base.pt", seed=5)
    base = load_checkpoint(base_path)
    finetuned = load_checkpoint(base_path)
    generator = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=generator) * DELTA_SCALE.get(_group(k), 0.0)
             for k, v in base.state.items()}
    finetuned.state = {k: v + delta[k] for k, v in base.state.items()}
    return root, base_path, base, finetuned, delta


def _run_cli(argv, capsys):
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("fmt", ["hf-ctc", "s3prl-states", "vox-profile", "hf-base"])
def test_extract_recovers_known_delta_across_formats(setup, fmt, tmp_path, capsys):
    root, base_path, base, finetuned, delta = setup
    base_arg = str(base_path)
    if fmt == "hf-ctc":
        ft_path = write_hf_model(finetuned, tmp_path / "ctc", head="ctc")
    elif fmt == "s3prl-states":
        ft_path = write_s3prl_states(finetuned, tmp_path / "states-5.ckpt", base_path=base_path)
    elif fmt == "vox-profile":
        ft_path = write_vox_profile(finetuned, tmp_path / "vox")
    else:  # HF base directory, unilm fine-tuned file
        base_arg = str(write_hf_model(load_checkpoint(base_path), tmp_path / "hfbase"))
        ft_path = tmp_path / "ft.pt"
        from tests.formats import unilm_state
        torch.save({"cfg": torch.load(base_path, weights_only=True)["cfg"], "model": unilm_state(finetuned)}, ft_path)
    out = tmp_path / "tau.safetensors"
    cli.main(["task-vector", "extract", "--base", base_arg, "--finetuned", str(ft_path), "-o", str(out)])
    capsys.readouterr()
    vector = task_vectors.load(out)
    for key, tensor in vector.tensors.items():
        torch.testing.assert_close(tensor, delta[key], atol=1e-6, rtol=0)
    assert vector.meta["base_fingerprint"] == task_vectors.fingerprint(base.state)
    assert vector.meta["finetuned"] == str(ft_path)

    code, captured = _run_cli(["task-vector", "inspect", str(out), "--json"], capsys)
    report = json.loads(captured.out)[0]
    assert code == 0
    norms = [g["norm"] for g in report["groups"]]
    assert [g["group"] for g in report["groups"]] == [0, 1, 2]
    assert norms[2] > norms[1] > 0 and norms[0] == 0
    assert report["zero_groups"] == [0]
    expected = [torch.cat([delta[k].flatten() for k in delta if _group(k) == g]).norm().item() for g in range(3)]
    assert norms == pytest.approx(expected, rel=1e-5)


def test_zero_vector_is_reported_loudly(setup, tmp_path, capsys):
    root, base_path, base, _, _ = setup
    frozen = write_vox_profile(load_checkpoint(base_path), tmp_path / "frozen")  # a backbone trained frozen
    out = tmp_path / "zero.safetensors"
    cli.main(["task-vector", "extract", "--base", str(base_path), "--finetuned", str(frozen), "-o", str(out)])
    assert "ZERO" in capsys.readouterr().err
    cli.main(["task-vector", "inspect", str(out), "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)[0]
    assert report["total_norm"] == 0 and report["zero_groups"] == [0, 1, 2]
    assert "ZERO" in captured.err


def test_inspect_cosines_between_two_vectors(setup, tmp_path, capsys):
    root, base_path, base, finetuned, delta = setup
    paths = []
    capsys.readouterr()
    for name, sign in (("plus", 1.0), ("minus", -1.0)):
        tensors = {k: sign * v for k, v in delta.items()}
        meta = {**task_vectors.extract(base_path, base_path)[1],
                "group_norms": task_vectors.group_norms(tensors, 2, True)}
        task_vectors.save(tmp_path / f"{name}.safetensors", tensors, meta)
        paths.append(str(tmp_path / f"{name}.safetensors"))
    cli.main(["task-vector", "inspect", *paths, "--json"])
    reports = json.loads(capsys.readouterr().out)
    assert [g["cosine"] for g in reports[0]["groups"]][1:] == pytest.approx([-1.0, -1.0])
    assert reports[0]["groups"][0]["cosine"] == 0.0  # zero group: cosine undefined, reported as 0
    cli.main(["task-vector", "inspect", *paths])
    assert "largest relative change: groups 2, 1" in capsys.readouterr().out


def test_bf16_storage_halves_the_file(setup, tmp_path):
    root, base_path, _, finetuned, _ = setup
    ft_path = write_vox_profile(finetuned, tmp_path / "vox")
    for dtype in ("float32", "bfloat16"):
        cli.main(["task-vector", "extract", "--base", str(base_path), "--finetuned", str(ft_path),
                  "-o", str(tmp_path / f"{dtype}.safetensors"), "--dtype", dtype])
    small, big = (tmp_path / "bfloat16.safetensors").stat().st_size, (tmp_path / "float32.safetensors").stat().st_size
    assert small < 0.6 * big
    stored = task_vectors.load(tmp_path / "bfloat16.safetensors").tensors
    assert stored["encoder.layers.0.feed_forward.intermediate_dense.weight"].dtype == torch.bfloat16


def test_cli_errors_are_one_line_exit_2_and_leave_no_file(setup, tmp_path, capsys):
    root, base_path, _, _, _ = setup
    other = write_unilm_checkpoint(tmp_path / "three_layers.pt", encoder_layers=3)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00\x01 nope")
    nan = tmp_path / "nan.pt"
    data = torch.load(base_path, weights_only=True)
    data["model"]["post_extract_proj.weight"][0, 0] = float("inf")
    torch.save(data, nan)
    cases = {other: "architecture differs", garbage: "not a readable PyTorch checkpoint", nan: "NaN or Inf",
             tmp_path / "nope.pt": "no such file"}
    out = tmp_path / "out.safetensors"
    for finetuned, expected in cases.items():
        code, captured = _run_cli(["task-vector", "extract", "--base", str(base_path), "--finetuned",
                                   str(finetuned), "-o", str(out)], capsys)
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0] and str(finetuned) in lines[0]
        assert "Traceback" not in captured.err and not out.exists()
    not_a_vector = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.ones(1)}, str(not_a_vector))
    code, captured = _run_cli(["task-vector", "inspect", str(not_a_vector)], capsys)
    assert code == 2 and "not an adaltm task vector" in captured.err
