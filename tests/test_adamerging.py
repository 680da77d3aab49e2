"""Label-free AdaMerging (`-d msp_podcast_adamerging`) through the real launcher: tensorwise λ with constraints and
TIES vectors trained on unlabelled audio through a frozen head, evaluated like every row, resumed with `-e`,
exported; its predictions and entropy against the frozen head run by hand on the learned merge."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from adaltm_core.audio import load_mono_16k
from adaltm_downstream.common.heads import UtteranceClassifier
from adaltm_downstream.common.results import run_name
from adaltm_upstream import adaltm_wavlm
from adaltm_upstream.checkpoints import load_checkpoint, torch_load
from adaltm_upstream.config import describe
from adaltm_upstream.states import read_lambdas
from tests.conftest import run_launcher, write_yaml


def write_head_run(path, layers: int, dim: int):
    """The states of a finished emotion run: s3prl's layer weights and an `emotion.head`, as msp_podcast_cat saves."""
    torch.manual_seed(0)
    head = UtteranceClassifier(dim, 8, 16)
    downstream = {f"emotion.head.{k}": v for k, v in head.state_dict().items()}
    torch.save({"Downstream": downstream, "Featurizer": {"weights": torch.randn(layers)},
                "Args": argparse.Namespace(upstream_feature_normalize=False, upstream_layer_selection=None)}, path)
    return path, downstream


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, merge_setup, mini_msp):
    root, _ = mini_msp
    work = tmp_path_factory.mktemp("adamerging")
    base = load_checkpoint(merge_setup["base"])
    head_path, head_state = write_head_run(work / "ser_run.ckpt", base.num_layers + 1, base.config.hidden_size)
    upstream_cfg = write_yaml(work / "adamerging.yaml", {
        "base": str(merge_setup["base"]),
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])},
        "merge": {"granularity": "tensorwise", "init": 0.3, "constraints": [{"name": "clamp", "low": 0, "high": 1}],
                  "vector_ops": [{"name": "ties", "top_k": 0.5}]}})
    expdir = work / "exp"
    override = ",,".join([
        f"config.downstream_expert.datarc.root={root}", f"config.downstream_expert.adamerging.head={head_path}",
        "config.runner.total_steps=4", "config.runner.eval_step=2", "config.runner.save_step=2",
        "config.runner.log_step=2", "config.optimizer.lr=0.05", "config.downstream_expert.datarc.batch_size=4",
        "config.downstream_expert.datarc.eval_batch_size=1", "config.downstream_expert.datarc.num_workers=0"])
    result = run_launcher(["-m", "train", "-u", "adaltm_wavlm", "-g", str(upstream_cfg),
                           "-d", "msp_podcast_adamerging", "-p", str(expdir), "-o", override], cwd=work)
    return work, upstream_cfg, expdir, head_path, head_state, result


def test_lambdas_move_and_the_head_stays_frozen(adapted):
    _, _, expdir, _, head_state, result = adapted
    assert "[msp_podcast_adamerging] dev (Development) step 2" in result.stderr
    states = torch_load(expdir / "states-4.ckpt")
    tasks, lambdas = read_lambdas(states["Upstream"])
    assert tasks == ["asr", "ser"] and lambdas.shape[0] > 3  # one row per tensor
    assert not torch.allclose(lambdas, torch.full_like(lambdas, 0.3))
    assert float(lambdas.min()) >= 0 and float(lambdas.max()) <= 1  # as merged: clamped
    for key, value in head_state.items():
        assert torch.equal(states["Downstream"][f"head.head.{key[len('emotion.head.'):]}"], value), key
    assert states["Upstream"]["_extra_state"]["vector_ops"] == [
        {"name": "ties", "top_k": 0.5, "aggregate": "mean", "scope": "tensor"}
    ]
    assert run_name(expdir, describe) == "asr+ser vectors (TIES top 0.5), tensorwise λ (msp_podcast_adamerging)"


def test_test_split_scored_like_every_row_matches_the_frozen_head_on_the_learned_merge(adapted, mini_msp):
    from adaltm_downstream.common.entropy import load_frozen_head

    work, upstream_cfg, expdir, head_path, _, _ = adapted
    run_launcher(["-m", "evaluate", "-e", str(expdir / "dev-best.ckpt"), "-t", "test"], cwd=work)
    metrics = json.loads((expdir / "test_metrics.json").read_text())
    assert metrics["test_set"] == "Test1" and {"uar", "macro_f1", "ci95", "confusion"} <= set(metrics)
    rows = [r.split("\t") for r in (expdir / "test_predictions.tsv").read_text().splitlines()[1:]]

    # by hand: the learned merge, every hidden state, the run's layer weights and head, −Σ p log p
    import yaml

    config = yaml.safe_load(upstream_cfg.read_text())
    upstream = adaltm_wavlm(model_config=config).eval()
    upstream.load_state_dict(torch_load(expdir / "dev-best.ckpt")["Upstream"])
    head = load_frozen_head(head_path)
    root, _ = mini_msp
    paths = {p.name: p for p in root.rglob("*.wav")}
    entropy = []
    with torch.no_grad():
        for row in rows[:3]:
            states = upstream([load_mono_16k(paths[row[0]])])["hidden_states"]
            probabilities = torch.softmax(head([torch.stack([s[0] for s in states], dim=1)]), -1)[0].numpy()
            np.testing.assert_allclose([float(v) for v in row[3:11]], probabilities, atol=2e-4)
        for row in rows:
            p = np.asarray([float(v) for v in row[3:11]], dtype=np.float64)
            entropy.append(-(p * np.log(np.clip(p, 1e-30, None))).sum())
    assert metrics["loss"] == pytest.approx(np.mean(entropy), abs=1e-3)  # the reported loss is the entropy

    question = paths[rows[0][0]]  # -m inference: the same prediction for one file
    run_launcher(["-m", "inference", "-e", str(expdir / "dev-best.ckpt"), "-t", str(question)], cwd=work)
    name, _, probabilities = (expdir / "inference.tsv").read_text().strip().split("\t")
    assert name == question.stem
    np.testing.assert_allclose([float(v) for v in probabilities.split()], [float(v) for v in rows[0][3:11]],
                               atol=2e-4)


def test_resume_continues_and_export_bakes_the_learned_merge(adapted, tmp_path):
    from adaltm_cli import main as cli

    work, upstream_cfg, expdir, _, _, _ = adapted
    run_launcher(["-m", "train", "-e", str(expdir / "states-4.ckpt"), "-o", "config.runner.total_steps=6"], cwd=work)
    before = read_lambdas(torch_load(expdir / "states-4.ckpt")["Upstream"])[1]
    after = read_lambdas(torch_load(expdir / "states-6.ckpt")["Upstream"])[1]
    assert after.shape == before.shape and not torch.equal(after, before)

    cli.main(["export", "-g", str(upstream_cfg), "--states", str(expdir / "states-6.ckpt"), "-o",
              str(tmp_path / "merged.pt"), "--format", "s3prl"])
    exported = torch_load(tmp_path / "merged.pt")
    provenance = exported["adaltm"]
    assert provenance["granularity"] == "tensorwise" and provenance["vector_ops"][0]["top_k"] == 0.5
    assert torch.tensor(provenance["lambdas"]).equal(after)
