"""Bad data a user can hand us (issue 18): a corpus with duplicate, leaking, malformed or undecodable labels and
transcripts and audio too short for the CNN; structurally broken checkpoints; forged task vectors. Each is refused
in-process through the function the command calls, with one line (or, for the corpus, one message) naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import WavLMConfig, WavLMModel

from adaltm_cli import main as cli
from adaltm_core.settings import SettingsError, parse
from adaltm_downstream.common.corpus import CorpusError
from adaltm_downstream.common.data import DataSettings
from adaltm_upstream import adaltm_wavlm, task_vectors
from adaltm_upstream.checkpoints import CheckpointError, load_checkpoint
from tests.conftest import TINY_UNILM_CFG
from tests.corpus_factory import write_mini_msp
from tests.formats import write_hf_model, write_vox_profile

SPLITS = {"train": "Train", "dev": "Development", "test": "Test1"}


def _datarc(root, **extra) -> DataSettings:
    return parse(DataSettings, {"root": str(root), "splits": SPLITS, **extra}, "downstream_expert.datarc")


def _receptive_field() -> int:
    """Oracle: the fewest samples for which transformers' own WavLM (standard CNN) yields one frame."""
    with torch.device("meta"):
        model = WavLMModel(WavLMConfig())
    lengths = model._get_feat_extract_output_lengths(torch.arange(1, 1000))
    return int(torch.nonzero(lengths > 0)[0]) + 1


@pytest.fixture
def msp(tmp_path):
    root = tmp_path / "MSP"
    write_mini_msp(root, {"Train": 5, "Development": 3, "Test1": 3})
    return root


def _append(path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def test_every_data_problem_is_listed_in_one_message(msp):
    labels = msp / "Labels" / "labels_consensus.csv"
    lines = labels.read_text(encoding="utf-8").splitlines()
    train_row, test_row = lines[2], next(line for line in lines if line.endswith(",Test1"))
    _append(labels, train_row)                                        # duplicate row, same split
    _append(labels, test_row.rsplit(",", 1)[0] + ",Train")            # a Test1 file also labelled Train
    _append(labels, "MSP-PODCAST_Trai_0099.wav,N")                    # short row
    transcript = msp / "Transcripts" / "MSP-PODCAST_Deve_0000.txt"
    transcript.write_bytes("FIRST LINE\nCAFÉ OLÉ\n".encode("latin-1"))
    minimum = _receptive_field()
    short, enough = "MSP-PODCAST_Trai_0000.wav", "MSP-PODCAST_Trai_0001.wav"
    sf.write(msp / "Audios" / short, np.full(minimum - 1, 0.1, dtype=np.float32), 16000)
    sf.write(msp / "Audios" / enough, np.full(minimum, 0.1, dtype=np.float32), 16000)

    with pytest.raises(CorpusError) as info:
        _datarc(msp).load_splits()
    message = str(info.value)
    problems = message.splitlines()[1:]
    assert message.splitlines()[0].endswith("5 problem(s) in the corpus:") and len(problems) == 5, message
    duplicate_line, leak_line, short_line = len(lines) + 1, len(lines) + 2, len(lines) + 3
    first_test = lines.index(test_row) + 1
    expected = [
        f"{labels}:{short_line}: 2 field(s), the header has",
        f"{labels}:{duplicate_line}: duplicate label row for {train_row.split(',')[0]} (first on line 3)",
        f"{labels}:{leak_line}: {test_row.split(',')[0]} is labelled in Train and in Test1 (line {first_test})",
        f"{transcript}:2: not UTF-8",
        f"{msp / 'Audios' / short}: {minimum - 1} samples at 16 kHz, shorter than the model's receptive field of "
        f"{minimum} samples (datarc.min_samples)",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, message)
    assert str(msp / "Audios" / enough) not in message and "\ufffd" not in message
    assert repr("É".encode("latin-1")) in message  # the offending byte is shown


def test_label_file_names_that_leave_the_audio_directory_are_refused(msp):
    labels = msp / "Labels" / "labels_consensus.csv"
    lines = labels.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("FileName,")
    for bad in ("../../../../etc/passwd", "/etc/passwd"):
        _append(labels, ",".join([bad, *lines[2].split(",")[1:]]))
    with pytest.raises(CorpusError) as info:
        _datarc(msp).load_splits()
    message = str(info.value)
    for line, bad in enumerate(("../../../../etc/passwd", "/etc/passwd"), len(lines) + 1):
        assert f"{labels}:{line}: FileName {bad!r} leaves the audio directory" in message, message
    assert "passwd: " not in message                   # refused before anything was read from there


def test_utf8_transcripts_are_kept_exactly_and_min_samples_is_a_setting(msp):
    transcript = msp / "Transcripts" / "MSP-PODCAST_Deve_0000.txt"
    transcript.write_text("CAFÉ OLÉ\n", encoding="utf-8")
    sf.write(msp / "Audios" / "MSP-PODCAST_Trai_0000.wav", np.full(300, 0.1, dtype=np.float32), 16000)
    splits = _datarc(msp, min_samples=300).load_splits()
    assert next(u for u in splits["dev"] if u.file == "MSP-PODCAST_Deve_0000.wav").transcript == "CAFÉ OLÉ"
    assert _datarc(msp).min_samples == _receptive_field()
    with pytest.raises(SettingsError, match=r"datarc\.crop_seconds: 0\.02 s is shorter than the model's receptive"):
        _datarc(msp, crop_seconds=0.02)


@pytest.mark.parametrize("name", ["labels_consensus.csv", "labels_detailed.csv"])
def test_undecodable_label_file_names_file_line_and_bytes(msp, name):
    path = msp / "Labels" / name
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"MSP-PODCAST", "MSP-PODCAST-\u00e9".encode("latin-1"), 1)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorpusError) as info:
        _datarc(msp).load_splits()
    assert str(info.value).startswith(f"{path}:4: not UTF-8 (invalid continuation byte: byte(s) b'\\xe9'")


# --- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_unilm):
    root = tmp_path_factory.mktemp("bad_ckpt")
    return root, torch.load(tiny_unilm, weights_only=True), write_hf_model(load_checkpoint(tiny_unilm), root / "hf")


def _unilm(root, name, data) -> str:
    torch.save(data, root / name)
    return str(root / name)


def _hf(root, hf, name, config: bytes) -> str:
    shutil.copytree(hf, root / name)
    (root / name / "config.json").write_bytes(config)
    return str(root / name)


def _hf_field(hf, **fields) -> bytes:
    return json.dumps({**json.loads((hf / "config.json").read_text()), **fields}).encode()


BAD_CHECKPOINTS = {
    "layers_str": (lambda r, d, h: _unilm(r, "a.pt", {**d, "cfg": {**d["cfg"], "encoder_layers": "24"}}),
                   "a.pt: cfg.encoder_layers is '24' (str), expected int"),
    "layers_none": (lambda r, d, h: _unilm(r, "b.pt", {**d, "cfg": {**d["cfg"], "encoder_layers": None}}),
                    "b.pt: cfg.encoder_layers is None (NoneType), expected int"),
    "normalize_str": (lambda r, d, h: _unilm(r, "c.pt", {**d, "cfg": {**d["cfg"], "normalize": "no"}}),
                      "c.pt: cfg.normalize is 'no' (str), expected bool"),
    "heads": (lambda r, d, h: _unilm(r, "d.pt", {**d, "cfg": {**d["cfg"], "encoder_attention_heads": 5}}),
              f"d.pt: cfg.encoder_attention_heads (5) does not divide cfg.encoder_embed_dim "
              f"({TINY_UNILM_CFG['encoder_embed_dim']})"),
    "model_list": (lambda r, d, h: _unilm(r, "e.pt", {**d, "model": [1, 2]}),
                   "e.pt: 'model' is a list, expected a state dict"),
    "model_int_keys": (lambda r, d, h: _unilm(r, "f.pt", {**d, "model": {1: torch.zeros(2)}}),
                       "f.pt: model: key 1 (int) is not a parameter name"),
    "nested_cfg": (lambda r, d, h: _unilm(r, "g.pt", {**d, "cfg": {"model": "large"}}),
                   "g.pt: cfg.model is a str, expected the model's config dict"),
    "top_list": (lambda r, d, h: _unilm(r, "h.pt", [d["cfg"]]), "h.pt: unknown checkpoint format (top level is list)"),
    "hf_list": (lambda r, d, h: _hf(r, h, "i", b"[1, 2]"), "i/config.json: expected a JSON object, got list"),
    "hf_latin1": (lambda r, d, h: _hf(r, h, "j", '{"model_type": "wavlm", "name": "WavLM \u00e9"}'.encode("latin-1")),
                  "j/config.json: not valid JSON ('utf-8' codec can't decode byte 0xe9"),
    "hf_hidden_str": (lambda r, d, h: _hf(r, h, "k", _hf_field(h, hidden_size="64")),
                      "k/config.json: not a valid WavLM config (TypeError: Field 'hidden_size' expected int, got str"),
    "hf_layers_none": (lambda r, d, h: _hf(r, h, "l", _hf_field(h, num_hidden_layers=None)),
                       "l/config.json: not a valid WavLM config (TypeError: Field 'num_hidden_layers' expected int"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_the_file(sources, case):
    root, data, hf = sources
    write, expected = BAD_CHECKPOINTS[case]
    path = write(root, data, hf)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(path) and expected in message and "\n" not in message, message


def test_tensors_of_the_wrong_rank_in_a_configless_source_are_one_line(sources):
    """vox-profile ships no WavLM config: sizes are read off the tensors, which must have WavLM's ranks."""
    root, _, hf = sources
    vox = write_vox_profile(load_checkpoint(hf), root / "vox")
    state = load_file(vox / "model.safetensors")
    state["backbone_model.encoder.layers.0.attention.gru_rel_pos_const"] = torch.ones(4)
    save_file(state, str(vox / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(vox)
    assert str(info.value) == (f"{vox}: encoder.layers.0.attention.gru_rel_pos_const has shape (4,), expected 4 "
                               "non-empty dimensions")


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["layers_str", "heads", "hf_list", "hf_hidden_str"])
def test_task_vector_extract_refuses_a_bad_base_in_one_line(sources, tiny_unilm, case, capsys):
    root, data, hf = sources
    (root / case).mkdir()
    bad = BAD_CHECKPOINTS[case][0](root / case, data, hf)
    out = root / case / "tau.safetensors"
    code, err = _run_cli(["task-vector", "extract", "--base", bad, "--finetuned", str(tiny_unilm), "-o", str(out)],
                         capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"adaltm: error: {bad}"), err
    assert "Traceback" not in err and not out.exists()


# --- forged task vectors -------------------------------------------------------------------------------------------


def _forge(source, target, change) -> str:
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(change(tensors), str(target), metadata=metadata)
    return str(target)


def test_integer_task_vector_is_refused_at_load(merge_setup, tmp_path, capsys):
    key = "encoder.layers.0.attention.q_proj.weight"
    forged = _forge(merge_setup["asr"], tmp_path / "int.safetensors",
                    lambda t: {**t, key: (t[key] * 1000).to(torch.int32)})
    with pytest.raises(task_vectors.TaskVectorError, match=f"{key} has dtype torch.int32"):
        task_vectors.load(forged)
    code, err = _run_cli(["task-vector", "inspect", forged], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"adaltm: error: {forged}: {key}"), err


@pytest.mark.parametrize("forgery, expected", [
    (lambda t: {k: v for k, v in t.items() if not k.startswith("encoder.layers.1.")}, "lacks"),
    (lambda t: {**t, "encoder.layers.0.fc9.weight": torch.zeros(2)}, "holds tensor(s) the base"),
    (lambda t: {**t, "encoder.layer_norm.weight": torch.zeros(3)}, "encoder.layer_norm.weight has shape (3,)"),
])
def test_task_vector_not_covering_the_base_is_refused_by_the_upstream(merge_setup, tmp_path, forgery, expected):
    forged = _forge(merge_setup["asr"], tmp_path / "forged.safetensors", forgery)
    assert task_vectors.load(forged).base_fingerprint  # its metadata still names the right base
    with pytest.raises(task_vectors.TaskVectorError) as info:
        adaltm_wavlm(model_config={"base": str(merge_setup["base"]), "task_vectors": {"asr": forged}})
    assert str(info.value).startswith(f"{forged}: ") and expected in str(info.value)
