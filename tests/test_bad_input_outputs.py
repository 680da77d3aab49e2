"""What the `adaltm` commands write (issue 24): an output never replaces one of the command's inputs or a file
that is not an earlier output of the same command; a full disk is one line naming the file, and leaves nothing
behind; broken run files given to `plot-lambdas` and `table` are one line each. Every case runs the CLI's `main`
in-process, as the command does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adaltm_cli.main import main
from adaltm_upstream import adaltm_wavlm
from tests.conftest import write_yaml
from tests.test_statistics import write_run


def fails(capsys, argv: list[str]) -> str:
    """The command's one error line (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def trained(tmp_path, merge_setup):
    """An adaltm_wavlm config with layer-wise λ and a states checkpoint of it in a run directory."""
    config = write_yaml(tmp_path / "up.yaml", {"base": str(merge_setup["base"]),
                                               "task_vectors": {"asr": str(merge_setup["asr"])}})
    expdir = tmp_path / "run"
    expdir.mkdir()
    upstream = adaltm_wavlm(model_config=str(config))
    torch.save({"Upstream": upstream.state_dict()}, expdir / "states-4.ckpt")
    return config, expdir, upstream


def test_export_never_replaces_its_own_inputs_or_a_foreign_file(tmp_path, trained, capsys):
    config, expdir, _ = trained
    states, before = expdir / "states-4.ckpt", config.read_bytes()
    for fmt in ("hf", "s3prl"):
        err = fails(capsys, ["export", "-g", str(config), "--states", str(states), "-o", str(config), "--format", fmt])
        assert f"{config}: -o would replace this command's -g config" in err
        assert config.read_bytes() == before
    err = fails(capsys, ["export", "-g", str(config), "--states", str(states), "-o", str(expdir), "--format", "hf"])
    assert f"{expdir}: -o would replace this command's --states" in err and states.is_file()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    err = fails(capsys, ["export", "-g", str(config), "--states", str(states), "-o", str(notes), "--format", "s3prl"])
    assert f"{notes}: exists and is not an earlier output of `adaltm export --format s3prl`" in err
    assert notes.read_text() == "mine"
    for fmt, out in (("s3prl", tmp_path / "merged.pt"), ("hf", tmp_path / "merged_hf")):
        for _ in range(2):                                 # an earlier export of the same command is replaced
            main(["export", "-g", str(config), "--states", str(states), "-o", str(out), "--format", fmt])
        wrong = "hf" if fmt == "s3prl" else "s3prl"        # ... but not by the other format's export
        err = fails(capsys, ["export", "-g", str(config), "--states", str(states), "-o", str(out), "--format", wrong])
        assert "is not an earlier output of `adaltm export --format" in err


def test_extract_table_and_plot_refuse_what_they_did_not_write(tmp_path, merge_setup, trained, capsys):
    base = merge_setup["base"]
    before = base.read_bytes()
    err = fails(capsys, ["task-vector", "extract", "--base", str(base), "--finetuned", str(base), "-o", str(base)])
    assert "would replace this command's --base" in err and base.read_bytes() == before
    vector = tmp_path / "tv.safetensors"
    shutil.copy(merge_setup["asr"], vector)                 # an earlier output of extract: replaced
    main(["task-vector", "extract", "--base", str(base), "--finetuned", str(base), "-o", str(vector)])

    _, expdir, _ = trained
    readme = tmp_path / "README.md"
    readme.write_text("# my notes\n")
    err = fails(capsys, ["plot-lambdas", str(expdir), "-o", str(readme)])
    assert "is not an earlier output of `adaltm plot-lambdas`" in err
    figure = tmp_path / "lambdas.png"
    for _ in range(2):
        main(["plot-lambdas", str(expdir), "-o", str(figure)])
    assert figure.read_bytes().startswith(b"\x89PNG")

    run = write_run(tmp_path / "good", [0, 1, 2, 3] * 10, [0, 1, 2, 2] * 10, ["s"] * 40)
    err = fails(capsys, ["table", str(run), "-o", str(readme)])
    assert "is not an earlier output of `adaltm table`" in err and readme.read_text() == "# my notes\n"
    err = fails(capsys, ["table", str(run), "-o", str(run / "table.md"), "--reference", str(run / "table.md")])
    for suffix in (".md", ".csv", ".tex"):
        for _ in range(2):
            main(["table", str(run), "-o", str(tmp_path / f"table{suffix}")])


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(full_disk, trained, merge_setup, capsys):
    config, expdir, _ = trained
    states, base = expdir / "states-4.ckpt", merge_setup["base"]
    cases = [(["task-vector", "extract", "--base", str(base), "--finetuned", str(base)], "tv.safetensors"),
             (["export", "-g", str(config), "--states", str(states), "--format", "s3prl"], "merged.pt"),
             (["export", "-g", str(config), "--states", str(states), "--format", "hf"], "merged_hf"),
             (["plot-lambdas", str(expdir)], "lambdas.png")]
    for argv, name in cases:
        err = fails(capsys, [*argv, "-o", str(full_disk / name)])
        assert f"{full_disk / name}" in err and "No space left on device" in err, err
        assert not list(full_disk.iterdir()), list(full_disk.iterdir())


def test_plot_lambdas_refuses_broken_runs_in_one_line(tmp_path, trained, capsys):
    _, expdir, upstream = trained
    out = str(tmp_path / "l.png")
    (expdir / "states-old.ckpt").write_bytes(b"a user's copy")      # not a name the runner writes: passed over
    main(["plot-lambdas", str(expdir), "-o", out])
    with torch.no_grad():
        upstream.merge.coefficients[1, 0] = float("nan")
    torch.save({"Upstream": upstream.state_dict()}, expdir / "states-8.ckpt")
    assert "states-8.ckpt: λ are not finite" in fails(capsys, ["plot-lambdas", str(expdir), "-o", out])
    for name, content in (("list", [1, 2]), ("tensor", {"Upstream": torch.zeros(3)})):
        run = tmp_path / name
        run.mkdir()
        torch.save(content, run / "states-2.ckpt")
        assert "states-2.ckpt: no learned λ" in fails(capsys, ["plot-lambdas", str(run), "-o", out])
    only_stray = tmp_path / "stray"
    only_stray.mkdir()
    (only_stray / "states-old.ckpt").write_bytes(b"x")
    assert "no dev-best.ckpt or states-<step>.ckpt" in fails(capsys, ["plot-lambdas", str(only_stray), "-o", out])


def test_table_refuses_broken_run_files_in_one_line(tmp_path, capsys):
    labels = [0, 1, 2, 3] * 10
    out = str(tmp_path / "t.md")
    corrupt = write_run(tmp_path / "corrupt", labels, labels, ["s"] * 40)
    (corrupt / "test_metrics.json").write_text('{"uar": 0.5, ')
    assert "test_metrics.json: not valid JSON" in fails(capsys, ["table", str(corrupt), "-o", out])
    listed = write_run(tmp_path / "listed", labels, labels, ["s"] * 40)
    (listed / "test_metrics.json").write_text(json.dumps([0.5, 0.4]))
    assert "test_metrics.json: not the metrics of an evaluation" in fails(capsys, ["table", str(listed), "-o", out])
    odd = write_run(tmp_path / "odd", labels, labels, ["s"] * 40)
    rows = (odd / "test_predictions.tsv").read_text().splitlines()
    rows[3] = rows[3].replace("\t2\t", "\tsad\t", 1)
    (odd / "test_predictions.tsv").write_text("\n".join(rows) + "\n")
    err = fails(capsys, ["table", str(odd), "-o", out])
    assert "test_predictions.tsv: line 4: label and pred must be class indices, got 'sad'" in err
    assert not (tmp_path / "t.md").exists()
