"""s3prl's stock SUPERB downstreams with the merged upstream: every expert imports, four tasks of different kinds
train and evaluate through the launcher (live `adaltm_wavlm` and the exported `wavlm_local` file), and the
`adaltm superb` command runs, resumes and tabulates them. Metrics are checked against the predictions each
downstream writes, recomputed with scikit-learn and jiwer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jiwer
import pandas
import pytest
import yaml
from sklearn.metrics import accuracy_score

from adaltm_cli import main as cli
from adaltm_core.errors import UserError
from adaltm_recipes import launch
from adaltm_recipes import superb as superb_command
from tests.conftest import launcher_env, run_launcher, write_yaml
from tests.superb_data import write_all

# Stock experts that cannot work on this stack even with the `superb` extra, and why (also in the README).
# The value is the import error seen first (sacrebleu; behind it, fairseq 0.12.2 needs omegaconf<2.1 where s3prl
# needs >=2.1.1, and fails on Python 3.11).
CANNOT_WORK = {
    "speech_translation": "No module named 'sacrebleu'",
}


IMPORT_ALL = """
import importlib, json, pathlib, sys
from adaltm_s3prl import compat
compat.apply_all()
import s3prl.downstream
folder = pathlib.Path(s3prl.downstream.__file__).parent
names = sorted(p.name for p in folder.iterdir() if (p / "expert.py").is_file())
failures = {}
for name in names:
    try:
        importlib.import_module(f"s3prl.downstream.{name}.expert")
    except Exception as error:
        failures[name] = f"{type(error).__name__}: {error}"
print(json.dumps({"names": names, "failures": failures}))
"""


def test_every_stock_expert_imports_after_the_compat_fixes():
    """In a process of its own: importing 34 experts (lightning, catalyst, asteroid, ...) must not leak into
    the other tests."""
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, env=launcher_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["names"]) == 34
    assert {"emotion", "asr", "voxceleb1", "fluent_commands", "speech_commands"} <= set(report["names"])
    assert set(report["failures"]) == set(CANNOT_WORK), report["failures"]
    for name, reason in CANNOT_WORK.items():
        assert reason in report["failures"][name], report["failures"][name]


@pytest.fixture(scope="module")
def superb(tmp_path_factory, merge_setup):
    """The four corpora and configs, the live upstream config and its s3prl export."""
    root = tmp_path_factory.mktemp("superb")
    tasks = write_all(root / "tasks")
    upstream_cfg = write_yaml(root / "dual.yaml", {
        "base": str(merge_setup["base"]),
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])},
        "merge": {"granularity": "layerwise", "init": 0.5}})
    static_cfg = write_yaml(root / "static.yaml", {  # fixed λ: exported without a training run's states
        "base": str(merge_setup["base"]),
        "task_vectors": {"asr": str(merge_setup["asr"]), "ser": str(merge_setup["ser"])},
        "merge": {"granularity": "static", "init": {"asr": 0.3, "ser": 0.7}}})
    merged = root / "merged.pt"
    cli.main(["export", "-g", str(static_cfg), "-o", str(merged), "--format", "s3prl"])
    return {"root": root, "tasks": tasks, "live": ["-u", "adaltm_wavlm", "-g", str(upstream_cfg)],
            "exported": ["-u", "wavlm_local", "-k", str(merged)]}


def _printed(stdout: str, split: str, metric: str) -> float:
    return float(re.findall(rf"^{split} {metric}: ([0-9.eE+-]+)$", stdout, flags=re.M)[-1])


def _rows(path: Path) -> dict[str, str]:
    return dict(line.split(maxsplit=1) for line in path.read_text().splitlines())


TEST_SPLIT = {"asr": "test-clean"}
SCALE = {"asr": 1.0}  # the asr expert prints and logs WER in percent, the others accuracy as a fraction


def recomputed(task: str, expdir: Path) -> float:
    """The test metric from the prediction files the stock downstream wrote, by an independent library."""
    if task == "asr":
        hyp, ref = _rows(expdir / "test-clean-noLM-hyp.ark"), _rows(expdir / "test-clean-noLM-ref.ark")
        return 100 * jiwer.wer([ref[k] for k in sorted(ref)], [hyp[k] for k in sorted(ref)])
    if task == "fluent_commands":
        pred, truth = ((expdir / f"test_{kind}.csv").read_text().splitlines() for kind in ("predict", "truth"))
        return accuracy_score(truth, pred)  # a whole (action, object, location) line must match
    prefix = "test_fold1" if task == "emotion" else "test"
    pred, truth = _rows(expdir / f"{prefix}_predict.txt"), _rows(expdir / f"{prefix}_truth.txt")
    return accuracy_score([truth[k] for k in sorted(truth)], [pred[k] for k in sorted(truth)])


@pytest.mark.parametrize("task", ["emotion", "asr", "voxceleb1", "fluent_commands"])
def test_stock_task_with_the_live_merge(superb, task):
    """Train a few steps with λ learning alongside the stock head; the runner evaluates dev and test."""
    config = superb["tasks"][task][1]
    expdir = superb["root"] / "live" / task
    test = TEST_SPLIT.get(task, "test")
    splits = f"config.runner.eval_dataloaders=['{'dev-clean' if task == 'asr' else 'dev'}','{test}']"
    result = run_launcher(["-m", "train", *superb["live"], "-d", task, "-c", str(config), "-p", str(expdir),
                           "-o", splits], cwd=superb["root"])
    assert "enabling upstream training (-f)" in result.stderr
    assert (expdir / "states-2.ckpt").is_file()
    metric = "wer" if task == "asr" else "acc"
    assert _printed(result.stdout, test, metric) == pytest.approx(recomputed(task, expdir), abs=1e-6)
    if task == "voxceleb1":  # its file-list cache lives in the experiment, not in s3prl's package
        import s3prl.downstream.voxceleb1 as package

        assert sorted(p.name for p in (expdir / "voxceleb1-cache").iterdir()) == ["dev.pkl", "test.pkl", "train.pkl"]
        assert not (Path(package.__file__).parent / ".cache").exists()


DATA_KEYS = {"emotion": "root", "asr": "libri_root", "voxceleb1": "file_path", "fluent_commands": "file_path"}


@pytest.fixture(scope="module")
def clone(superb):
    """A stand-in for the user's s3prl clone: s3prl/downstream/<task>/config.yaml with placeholder data roots
    and the stock configs' long schedules (the test shortens them with --override, as a user may)."""
    package = superb["root"] / "s3prl-clone" / "s3prl"
    for task, (_, config_path) in superb["tasks"].items():
        config = yaml.safe_load(config_path.read_text())
        config["runner"]["total_steps"] = 200000
        config["downstream_expert"]["datarc"][DATA_KEYS[task]] = "/path/to/corpus"
        if task == "asr":  # as in the stock config: a table s3prl's preprocessing would have written
            config["downstream_expert"]["datarc"]["bucket_file"] = "./data/librispeech/len_for_bucket"
        (package / "downstream" / task).mkdir(parents=True)
        write_yaml(package / "downstream" / task / "config.yaml", config)
    return package.parent


def superb_args(superb, clone, out, tasks=("emotion", "asr", "voxceleb1", "fluent_commands")) -> list[str]:
    return ["superb", "--merged", superb["exported"][-1], "--tasks", ",".join(tasks), "--s3prl-repo", str(clone),
            "--data", *(f"{t}={superb['tasks'][t][0]}" for t in tasks), "--override", "runner.total_steps=2",
            "--out", str(out)]


def test_superb_command_runs_resumes_and_tabulates(superb, clone, tmp_path, monkeypatch):
    for key, value in launcher_env().items():  # the launcher processes inherit it: one thread each, no CUDA
        monkeypatch.setenv(key, value)
    out = tmp_path / "superb"
    cli.main(superb_args(superb, clone, out))
    table = (out / "superb.md").read_text()
    results = json.loads((out / "superb.json").read_text())["results"]
    assert [r["task"] for r in results] == ["emotion", "asr", "voxceleb1", "fluent_commands"]
    for r in results:
        expdir = out / r["task"] / "exp"
        scale = SCALE.get(r["task"], 100.0)
        assert r["value"] == pytest.approx(scale * recomputed(r["task"], expdir), abs=1e-4)
        assert r["checkpoint"] in {"dev-best.ckpt", "dev-clean-best.ckpt", "states-2.ckpt"}
        assert f"| {r['task']} |" in table and f"{r['value']:.2f}" in table
        written = yaml.safe_load((out / r["task"] / "config.yaml").read_text())
        assert written["runner"]["total_steps"] == 2  # the override reached the config the launcher ran
    # the length tables made for asr hold what the corpus writer knows: every file and its length in samples
    made, truth = out / "asr" / "len_for_bucket", Path(superb["tasks"]["asr"][0]) / "len_for_bucket"
    for split in ("train-clean-100", "dev-clean", "test-clean"):
        read = [pandas.read_csv(folder / f"{split}.csv") for folder in (made, truth)]
        assert sorted(zip(read[0].file_path, read[0].length)) == sorted(zip(read[1].file_path, read[1].length))
    # finished tasks are skipped: a launcher that would fail is never started
    monkeypatch.setattr(launch, "SCALARS_LAUNCHER", ["false"])
    (out / "superb.md").unlink()
    cli.main(superb_args(superb, clone, out))
    assert (out / "superb.md").read_text() == table


@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(a.index("--tasks") + 1, "emotion,ks"), "ks: unknown task"),
    (lambda a: a.remove(next(x for x in a if x.startswith("asr="))), "asr: no data root"),
    (lambda a: a.__setitem__(a.index("--data") + 1, "emotion=/nonexistent"), "emotion: data root /nonexistent"),
    (lambda a: a.extend(["--override", "asr:downstream_expert.datarc.dict_path=missing.dict"]),
     "asr: downstream_expert.datarc.dict_path: missing.dict not found"),
    (lambda a: a.extend(["--data", f"asr={a[a.index('--data') + 1].split('=')[1]}"]),  # the IEMOCAP folder
     "has no train-clean-100/ folder"),
    (lambda a: a.extend(["--override", "voxceleb1:runner.save_step=3"]),
     "voxceleb1: runner.total_steps 2 is not a multiple of runner.save_step 3"),
])
def test_superb_input_errors_name_the_task_before_training(superb, clone, tmp_path, capsys, monkeypatch, change,
                                                           message):
    monkeypatch.setattr(launch, "SCALARS_LAUNCHER", ["false"])
    args = superb_args(superb, clone, tmp_path / "out")
    change(args)
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_superb_needs_a_stock_config_per_task(tmp_path):
    empty = tmp_path / "clone"
    (empty / "s3prl" / "downstream" / "emotion").mkdir(parents=True)
    with pytest.raises(UserError, match="^emotion: no stock config at"):
        superb_command.plan_all(["emotion"], empty, [f"emotion={tmp_path}"], [], tmp_path / "out")


def test_superb_upstream_is_the_live_merge_or_an_export(tmp_path):
    config = write_yaml(tmp_path / "dual.yaml", {})
    assert superb_command.upstream_arguments(str(config), None) == ["-u", "adaltm_wavlm", "-g", str(config)]
    assert superb_command.upstream_arguments(None, str(config))[:2] == ["-u", "wavlm_local"]
    with pytest.raises(UserError, match="exactly one"):
        superb_command.upstream_arguments(str(config), str(config))
    with pytest.raises(UserError, match="missing.pt: no such file"):
        superb_command.upstream_arguments(None, str(tmp_path / "missing.pt"))
