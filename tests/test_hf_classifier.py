"""`adaltm export --format hf-classifier` and `adaltm predict`: a finished emotion run as a stock transformers
classifier. The oracle is the launcher itself: `run_downstream.py -m evaluate` writes each test file's 8
probabilities, and transformers' `pipeline("audio-classification")` on the export must give the same within 1e-4.

Three real runs share one module fixture (trained side by side, then evaluated side by side): a layer-wise AdaLTM
run (pre-LN base that normalises waveforms, `hidden_states: transformer`), a frozen baseline on a post-LN base with a
group-norm CNN, and stock `wavlm_local -f` (the whole pre-LN model fine-tuned, s3prl's 3 states) on the MTL
downstream, whose emotion head is exported the same way. The launcher
evaluates one utterance per batch: s3prl's featurizer keeps round(samples / 320) frames of each utterance, so in a
batch with a longer one an utterance can gain a padding frame the head averages in (see the README)."""

from __future__ import annotations

import argparse
import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, WavLMForSequenceClassification, pipeline

from adaltm_cli.main import main as adaltm
from adaltm_core.audio import load_mono_16k
from adaltm_core.errors import UserError
from adaltm_core.safe_load import torch_load
from adaltm_downstream.common.corpus import CLASS_NAMES
from adaltm_recipes.predict import export_and_score
from adaltm_s3prl.classifier_export import export_classifier, layer_weights
from tests.conftest import run_launcher, write_unilm_checkpoint, write_yaml
from tests.corpus_factory import tone

TRAIN = ("config.runner.total_steps=2,,config.runner.eval_step=2,,config.runner.save_step=2,,"
         "config.runner.log_step=2,,config.optimizer.lr=1.0e-3,,config.downstream_expert.datarc.batch_size=4,,"
         "config.downstream_expert.datarc.num_workers=0,,config.downstream_expert.datarc.require_transcript=False")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: on a shared 2-core CPU a second OpenMP thread mostly spins (measured: the pipeline on 8
    files took 3.4 s with 2 threads, 0.23 s with 1, under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mini_msp, merge_setup):
    """{kind: experiment directory} of three finished runs, each evaluated on Test1 by the launcher."""
    root = tmp_path_factory.mktemp("classifier_runs")
    corpus = f"config.downstream_expert.datarc.root={mini_msp[0]}"
    post_ln = write_unilm_checkpoint(root / "post_ln.pt", seed=3, extractor_mode="default", layer_norm_first=False,
                                     normalize=False)
    layerwise = write_yaml(root / "layerwise.yaml", {
        "base": str(merge_setup["base"]), "hidden_states": "transformer", "merge": {"granularity": "layerwise"},
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])}})
    baseline = write_yaml(root / "baseline.yaml", {"base": str(post_ln), "task_vectors": {},
                                                   "merge": {"granularity": "static"}, "hidden_states": "transformer"})
    upstreams = {"layerwise": ["-u", "adaltm_wavlm", "-g", str(layerwise)],
                 "baseline": ["-u", "adaltm_wavlm", "-g", str(baseline)],
                 "wavlm_local": ["-u", "wavlm_local", "-k", str(merge_setup["base"]), "-f"]}
    downstreams = {"layerwise": "msp_podcast_cat", "baseline": "msp_podcast_cat", "wavlm_local": "msp_podcast_mtl"}
    expdirs = {kind: root / kind for kind in upstreams}
    with ThreadPoolExecutor(len(upstreams)) as pool:
        list(pool.map(lambda kind: run_launcher(
            ["-m", "train", *upstreams[kind], "-d", downstreams[kind], "-p", str(expdirs[kind]),
             "-o", f"{corpus},,{TRAIN}", "--device", "cpu"], cwd=root), upstreams))
        list(pool.map(lambda kind: run_launcher(
            ["-m", "evaluate", "-e", str(expdirs[kind] / "dev-best.ckpt"), "-t", "test", "--device", "cpu",
             "-o", "config.downstream_expert.datarc.eval_batch_size=1"], cwd=root), upstreams))
    return expdirs


def launcher_probabilities(expdir: Path) -> dict[str, np.ndarray]:
    rows = csv.DictReader(open(expdir / "test_predictions.tsv"), delimiter="\t")
    return {row["file"]: np.array([float(row[f"p_{k}"]) for k in range(8)]) for row in rows}


def pipeline_probabilities(classify, wav: np.ndarray, rate: int = 16000) -> np.ndarray:
    scores = {r["label"]: r["score"] for r in classify({"raw": wav, "sampling_rate": rate}, top_k=None)}
    return np.array([scores[name] for name in CLASS_NAMES])


@pytest.mark.parametrize("kind", ["layerwise", "baseline", "wavlm_local"])
def test_pipeline_and_auto_model_give_the_launchers_probabilities(runs, kind, mini_msp, tmp_path, capsys):
    out = tmp_path / "classifier"
    adaltm(["export", "--format", "hf-classifier", "--states", str(runs[kind]), "-o", str(out)])
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["WavLMForSequenceClassification"] and "auto_map" not in config
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}  # 8 labels, corpus order
    assert config["tie_last_hidden_states"] is True and config["use_weighted_layer_sum"] is True
    normalize = kind != "baseline"  # the tiny pre-LN base asks for per-utterance normalisation, the post-LN one not
    assert json.loads((out / "preprocessor_config.json").read_text())["do_normalize"] is normalize

    expected = launcher_probabilities(runs[kind])
    assert len(expected) == (8 if kind != "wavlm_local" else 7)   # MTL: evaluable files with a transcript
    classify = pipeline("audio-classification", model=str(out), trust_remote_code=True)
    model = AutoModelForAudioClassification.from_pretrained(out, trust_remote_code=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert type(model) is WavLMForSequenceClassification
    untied = WavLMForSequenceClassification.from_pretrained(out, tie_last_hidden_states=False).eval()
    worst_untied = 0.0
    for name, want in expected.items():
        wav = load_mono_16k(mini_msp[0] / "Audios" / name).numpy()
        assert np.abs(pipeline_probabilities(classify, wav) - want).max() < 1e-4, name
        inputs = extractor(wav, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            assert np.abs(model(**inputs).logits.softmax(-1)[0].numpy() - want).max() < 1e-4, name
            worst_untied = max(worst_untied, np.abs(untied(**inputs).logits.softmax(-1)[0].numpy() - want).max())
    # transformers' own last state (before a pre-LN encoder's final LayerNorm) is not s3prl's; post-LN: the same
    assert worst_untied > 1e-4 if kind != "baseline" else worst_untied < 1e-4


def test_export_weights_layers_and_provenance(runs, tmp_path):
    out = export_classifier(runs["layerwise"] / "dev-best.ckpt", tmp_path / "c")
    tensors = load_file(out / "model.safetensors")
    hf_export = tmp_path / "hf"
    adaltm(["export", "--format", "hf", "-g", str(runs["layerwise"].parent / "layerwise.yaml"),
            "--states", str(runs["layerwise"]), "-o", str(hf_export)])
    backbone = load_file(hf_export / "model.safetensors")
    assert all(torch.equal(tensors[f"wavlm.{name}"], tensor) for name, tensor in backbone.items())
    assert set(tensors) - {f"wavlm.{n}" for n in backbone} == {"layer_weights", "projector.weight", "projector.bias",
                                                              "classifier.weight", "classifier.bias"}
    states = torch_load(runs["layerwise"] / "dev-best.ckpt")
    assert tensors["layer_weights"][0] == -torch.inf   # hidden_states: transformer never saw the CNN state
    assert torch.equal(tensors["layer_weights"][1:], states["Featurizer"]["weights"])
    assert torch.equal(tensors["classifier.weight"], states["Downstream"]["emotion.head.classifier.0.weight"])
    provenance = json.loads((out / "adaltm_export.json").read_text())
    assert provenance["classifier"]["upstream"] == "adaltm_wavlm" and provenance["granularity"] == "layerwise"
    assert provenance["config"] == str(runs["layerwise"].parent / "layerwise.yaml")


def test_export_and_score_gives_the_launchers_accuracy(runs, mini_msp, tmp_path):
    """What the demo calls: the pipeline's accuracy on the launcher's test files equals the launcher's."""
    rows = list(csv.DictReader(open(runs["layerwise"] / "test_predictions.tsv"), delimiter="\t"))
    files = [mini_msp[0] / "Audios" / row["file"] for row in rows]
    score = export_and_score(runs["layerwise"], tmp_path / "classifier", files, [int(r["label"]) for r in rows])
    metrics = json.loads((runs["layerwise"] / "test_metrics.json").read_text())
    assert score["n"] == metrics["n"] and score["accuracy"] == metrics["accuracy"] and score["uar"] == metrics["uar"]
    launcher = np.array([[float(r[f"p_{k}"]) for k in range(8)] for r in rows])
    assert np.abs(np.asarray(score["probabilities"]) - launcher).max() < 1e-4


def write_folder(folder: Path) -> None:
    rng = np.random.default_rng(7)
    folder.mkdir()
    sf.write(folder / "stereo_8k.wav", np.stack([tone("A", 1.3, rng, 8000)] * 2, axis=1), 8000)
    sf.write(folder / "long_44k.flac", tone("S", 2.5, rng, 44100), 44100)
    sf.write(folder / "short_16k.wav", tone("H", 0.7, rng), 16000)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    (folder / "notes.txt").write_text("not audio, not read")


def test_predict_over_a_folder_matches_the_pipeline_and_names_the_corrupt_file(runs, tmp_path, capsys):
    folder = tmp_path / "audio"
    write_folder(folder)
    out = tmp_path / "emotions.tsv"
    with pytest.raises(SystemExit) as exit_:   # a run directory: exported on the fly
        adaltm(["predict", str(runs["layerwise"]), str(folder), "-o", str(out), "--batch-size", "3"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("adaltm: skipped") == 1
    assert f"skipped {folder / 'corrupt.wav'}: unreadable audio" in captured.err
    rows = list(csv.DictReader(open(out), delimiter="\t"))
    assert [Path(r["file"]).name for r in rows] == ["long_44k.flac", "short_16k.wav", "stereo_8k.wav"]
    assert list(rows[0])[:3] == ["file", "pred", "emotion"] and list(rows[0])[3:] == [f"p_{n}" for n in CLASS_NAMES]

    classifier = tmp_path / "classifier"
    export_classifier(runs["layerwise"], classifier)
    classify = pipeline("audio-classification", model=str(classifier))
    for row in rows:   # batched with padding (a layer-norm CNN) = one at a time, resampled by the pipeline
        data, rate = sf.read(row["file"], dtype="float32", always_2d=True)
        got = np.array([float(row[f"p_{n}"]) for n in CLASS_NAMES])
        want = pipeline_probabilities(classify, data.mean(axis=1), rate)
        assert np.abs(got - want).max() < 1e-5 and int(row["pred"]) == int(want.argmax())
        assert row["emotion"] == CLASS_NAMES[int(row["pred"])]

    chunks = tmp_path / "chunks.csv"   # group-norm CNN (the baseline): equal lengths only in a batch
    baseline = tmp_path / "baseline"
    export_classifier(runs["baseline"], baseline)
    adaltm(["predict", str(baseline), str(folder / "long_44k.flac"), str(folder / "short_16k.wav"),
            "--chunk", "1", "-o", str(chunks)])
    rows = list(csv.DictReader(open(chunks)))
    assert [(Path(r["file"]).name, r["start"], r["end"]) for r in rows] == [
        ("long_44k.flac", "0.00", "1.00"), ("long_44k.flac", "1.00", "2.00"), ("long_44k.flac", "2.00", "2.50"),
        ("short_16k.wav", "0.00", "0.70")]
    classify = pipeline("audio-classification", model=str(baseline))
    wav = load_mono_16k(folder / "long_44k.flac").numpy()
    want = pipeline_probabilities(classify, wav[16000:32000])
    assert np.abs(np.array([float(rows[1][f"p_{n}"]) for n in CLASS_NAMES]) - want).max() < 1e-5


def fake_run(path: Path, hidden_dim: int = 0, max_seconds: float | None = None, **args) -> Path:
    """Just enough of a run's states for the checks made before any weight is read."""
    head = {"emotion.head.projector.weight": torch.zeros(4, 6), "emotion.head.projector.bias": torch.zeros(4),
            "emotion.head.classifier.0.weight": torch.zeros(hidden_dim or 8, 4),
            "emotion.head.classifier.0.bias": torch.zeros(hidden_dim or 8)}
    if hidden_dim:
        head.update({"emotion.head.classifier.3.weight": torch.zeros(8, hidden_dim),
                     "emotion.head.classifier.3.bias": torch.zeros(8)})
    namespace = argparse.Namespace(**{"downstream": "msp_podcast_cat", "upstream": "adaltm_wavlm",
                                      "upstream_model_config": "missing.yaml", "upstream_ckpt": None,
                                      "upstream_feature_selection": "hidden_states", "upstream_layer_selection": None,
                                      "upstream_feature_normalize": False, **args})
    torch.save({"Args": namespace, "Downstream": head, "Featurizer": {"weights": torch.zeros(3)},
                "Config": {"downstream_expert": {"datarc": {"max_seconds": max_seconds}}}}, path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"hidden_dim": 5}, "the head has a hidden layer"),
    ({"upstream_feature_normalize": True}, "--upstream_feature_normalize"),
    ({"max_seconds": 3.0}, "only the first 3.0 s of each file"),
    ({"downstream": "msp_podcast_asr"}, "a msp_podcast_asr run; only msp_podcast_cat and msp_podcast_mtl"),
    ({"upstream": "hubert_local"}, "upstream hubert_local; only adaltm_wavlm and wavlm_local"),
    ({}, "the run's -g config 'missing.yaml' is not found from here"),
])
def test_what_the_stock_class_cannot_compute_is_refused(tmp_path, change, message, capsys):
    states = fake_run(tmp_path / "dev-best.ckpt", **change)
    with pytest.raises(SystemExit) as exit_:
        adaltm(["export", "--format", "hf-classifier", "--states", str(tmp_path), "-o", str(tmp_path / "out")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"adaltm: error: {states}: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_featurizer_selection_becomes_layer_weights():
    def args(selection="hidden_states", layer=None):
        return argparse.Namespace(upstream_feature_selection=selection, upstream_layer_selection=layer)

    learned = torch.tensor([0.5, -1.0, 2.0])
    weights = layer_weights(args(), {"weights": learned}, "transformer", 3, Path("s"))
    assert weights[0] == -torch.inf and torch.equal(weights[1:], learned)
    # softmax over transformers' 4 states = s3prl's softmax over the 3 it saw
    assert torch.allclose(weights.softmax(-1)[1:], learned.softmax(-1), atol=0)
    one_hot = layer_weights(args(layer=-1), {}, "all", 3, Path("s")).softmax(-1)
    assert one_hot.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert layer_weights(args("last_hidden_state"), {}, "transformer", 3, Path("s")).softmax(-1)[3] == 1.0
    assert layer_weights(args("hidden_state_0"), {}, "transformer", 3, Path("s")).softmax(-1)[1] == 1.0
    with pytest.raises(UserError, match="do not match the 4 hidden states"):
        layer_weights(args(), {"weights": learned}, "all", 3, Path("s"))
    with pytest.raises(UserError, match="-l 7: the upstream has 3 hidden states"):
        layer_weights(args(layer=7), {}, "transformer", 3, Path("s"))


def test_predict_refuses_bad_requests_in_one_line(tmp_path, capsys):
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig

    folder = tmp_path / "audio"
    write_folder(folder)
    model = tmp_path / "model"
    model.mkdir()
    tiny_classifier = tmp_path / "tiny_classifier"   # any stock audio classifier directory
    WavLMForSequenceClassification(WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=16, conv_dim=(8,), conv_kernel=(10,),
                                               conv_stride=(5,), num_conv_pos_embeddings=4,
                                               num_conv_pos_embedding_groups=2, num_labels=8)).save_pretrained(
        tiny_classifier)
    Wav2Vec2FeatureExtractor().save_pretrained(tiny_classifier)
    capsys.readouterr()
    for argv, message in [
        ([str(model), str(folder), "-o", str(folder / "short_16k.wav")], "is one of the audio inputs"),
        ([str(model), str(folder), "-o", str(tmp_path / "out.json")], "must end in .tsv or .csv"),
        ([str(model), str(tmp_path / "absent"), "-o", str(tmp_path / "o.tsv")], "absent: no such file or folder"),
        ([str(model), str(folder), "-o", str(tmp_path / "o.tsv")], "neither a classifier directory"),
        ([str(tiny_classifier), str(folder), "-o", str(tmp_path / "o.tsv"), "--device", "cuda:64"],
         "--device cuda:64: no such CUDA device here"),
        ([str(tiny_classifier), str(folder), "-o", str(tmp_path / "o.tsv"), "--device", "gpu"],
         "--device gpu: not a torch device"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            adaltm(["predict", *argv])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and message in error and error.count("\n") == 1, error
    assert not (tmp_path / "o.tsv").exists()
    with pytest.raises(SystemExit) as exit_:
        adaltm(["predict", str(tiny_classifier), str(folder), "-o", str(tmp_path / "o.tsv"), "--chunk", "0"])
    assert exit_.value.code == 2 and "--chunk: invalid positive_float value: '0'" in capsys.readouterr().err


def test_export_asks_for_what_each_format_needs(tmp_path, capsys):
    for argv, message in [(["--format", "hf"], "export --format hf: pass -g"),
                          (["--format", "hf-classifier", "--init"], "--format hf-classifier: pass --states EXPDIR"),
                          (["--format", "hf-classifier", "--states", str(tmp_path)], "no dev-best.ckpt in this run")]:
        with pytest.raises(SystemExit) as exit_:
            adaltm(["export", *argv, "-o", str(tmp_path / "out")])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and message in error and error.count("\n") == 1, error
