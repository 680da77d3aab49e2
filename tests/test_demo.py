"""The demo corpus generator and the quick end-to-end demo (the project's front door)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import wait
from pathlib import Path

import pytest
from tqdm import tqdm

from adaltm_core.errors import UserError
from adaltm_core.safe_load import torch_load
from adaltm_downstream.common.corpus import CorpusSpec, load_corpus
from adaltm_recipes import demo_corpus
from adaltm_recipes.demo.jobs import JobPool
from adaltm_recipes.demo_corpus import (
    AMBIGUOUS_SHARE,
    IN_DOMAIN_VOICES,
    LEXICAL_SHARE,
    LEXICON,
    OUT_OF_DOMAIN_VOICES,
    PROFILES,
    make_corpus,
    plan_corpus,
)
from adaltm_upstream.states import read_lambdas
from tests.conftest import ROOT, launcher_env, run_bounded

SIZES = {"Train": 40, "Development": 12, "Test1": 12}


def _digest(root):
    digest = hashlib.sha256()
    for path in sorted((root / "Audios").iterdir()) + sorted((root / "Labels").iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_corpus_is_deterministic_speaker_disjoint_and_msp_like(tmp_path):
    first, second = make_corpus(tmp_path / "a", SIZES, seed=3), make_corpus(tmp_path / "b", SIZES, seed=3)
    assert _digest(first) == _digest(second)
    assert _digest(make_corpus(tmp_path / "c", SIZES, seed=4)) != _digest(first)

    rows = list(csv.DictReader(open(first / "Labels" / "labels_consensus.csv")))
    speakers = {split: {r["SpkrID"] for r in rows if r["Split_Set"] == split} for split in SIZES}
    assert not speakers["Train"] & speakers["Test1"] and not speakers["Train"] & speakers["Development"]
    assert speakers["Test1"] <= set(IN_DOMAIN_VOICES["Test1"])
    counts = Counter(r["EmoClass"] for r in rows)
    assert counts["N"] + counts["H"] > counts["F"] + counts["C"] + counts["D"]
    votes = Counter(r["FileName"] for r in csv.DictReader(open(first / "Labels" / "labels_detailed.csv")))
    assert set(votes.values()) == {5}

    loaded = load_corpus(CorpusSpec(first, require_transcript=True), list(SIZES))  # reads as the real corpus does
    assert sum(len(v) for v in loaded.values()) == sum(SIZES.values())
    assert all(u.transcript and 0.3 < u.seconds < 6 for v in loaded.values() for u in v)

    classes = Counter(u.code for u in plan_corpus({"Train": 400}, seed=0))   # the labels, without the audio
    assert set(classes) == set("ACDFHNSUXO") and classes["N"] > classes["F"]


def test_corpus_is_the_same_when_the_synthesiser_errs_once(tmp_path, monkeypatch):
    """espeak-ng once rendered an utterance differently on a fresh machine: a corpus made while the synthesiser
    errs once must still be the seed's corpus, byte for byte."""
    sizes, real, calls, lock = {"Train": 6, "Test1": 2}, demo_corpus.render, [], threading.Lock()

    def errs_once(*job):
        real(*job)
        with lock:
            calls.append(job[-1])
            first = len(calls) == 1
        if first:                                      # same length, other samples: what was seen on that machine
            data = bytearray(job[-1].read_bytes())
            data[-2000:] = bytes(255 - b for b in data[-2000:])
            job[-1].write_bytes(data)

    monkeypatch.setattr(demo_corpus, "render", errs_once)
    flaky = make_corpus(tmp_path / "flaky", sizes, seed=3)
    monkeypatch.undo()
    assert _digest(flaky) == _digest(make_corpus(tmp_path / "good", sizes, seed=3))
    assert len(calls) == 2 * 8 + 1                      # each rendered until two renderings agreed; one erred


def test_corpus_refuses_a_synthesiser_that_never_agrees(tmp_path, monkeypatch):
    def noise(*job):
        job[-1].write_bytes(os.urandom(64))

    monkeypatch.setattr(demo_corpus, "render", noise)
    with pytest.raises(UserError, match="MSP-PODCAST_TRAI_00000.wav: espeak-ng and sox gave 5 different renderings"):
        make_corpus(tmp_path / "bad", {"Train": 1}, seed=0)
    assert not list((tmp_path / "bad" / "Audios").iterdir())   # no partial file, no scratch directory left


def test_out_of_domain_corpus_is_neutral_with_other_voices(tmp_path):
    root = make_corpus(tmp_path / "ood", {"Train": 10, "Development": 4, "Test1": 4}, seed=1, out_of_domain=True)
    rows = list(csv.DictReader(open(root / "Labels" / "labels_consensus.csv")))
    assert {r["EmoClass"] for r in rows} == {"N"}
    voices = {r["SpkrID"] for r in rows}
    in_domain = {v for vs in IN_DOMAIN_VOICES.values() for v in vs}
    assert voices <= {v for vs in OUT_OF_DOMAIN_VOICES.values() for v in vs} and not voices & in_domain


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"  # given relative to the working directory, as `make demo`'s default is
    done = run_bounded([sys.executable, "-m", "adaltm_cli.main", "demo", "--quick", "--out", "demo"], 600,
                       cwd=tmp_path, env=launcher_env())            # on a timeout, its workers are killed too
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in rows]
    expected_rows = ["MTL (fully trainable)", "MTL w/ static init (W_base + 0.5ΔW)",
                     "Setup 1: Baseline (frozen backbone)", "Setup 2: ASR-only vector", "Setup 3: SER-only vector",
                     "Setup 4: Dual-vector (proposed)", "Out-of-domain dual vectors",
                     "Static global merging (λ = 0.5)", "Adaptive global merging",
                     "Adaptive layer-wise merging (ours)", "HarmoniFuse (fine-tuned backbone, paper fusion)",
                     "TIES-merging (top 20 %, static λ = 0.5)", "DARE (p = 0.5, static λ = 0.5)",
                     "AdaMerging, label-free (tensorwise λ, SER model's frozen head)",
                     "HarmoniFuse (fine-tuned backbone, extended fusion: ours)",
                     "TIES over the whole model (FusionBench's: top 20 %, disjoint sum, static λ = 0.5)",
                     "EMR-merging for SER (static λ = 0.5)", "EMR-merging for SER (layer-wise λ from 1)",
                     "Localize-and-Stitch, dataless (top 10 %, static λ = 0.5)", "TSV-Merge (static λ = 0.5)",
                     "TSV-Merge (layer-wise λ from 1)", "Iso-C (static λ = 0.5)", "Iso-CTS (static λ = 0.5)"]
    for expected in expected_rows:
        assert expected in names
    grid = json.loads((out / "runs" / "task_arithmetic" / "grid.json").read_text())
    best = min(grid["points"], key=lambda p: p["loss"])["lambda"]            # λ* = the lowest dev loss
    assert f"Task arithmetic (global λ* = {best:g}, chosen on dev, SER model's frozen head)" in names
    for row in rows:
        assert set(row) == {"name", "uar", "precision", "macro_f1", "ci95", "wer"}
        if row["uar"] is not None:
            assert 0 <= row["uar"] <= 1 and row["ci95"]["uar"][0] <= row["uar"] <= row["ci95"]["uar"][1]
    assert next(r for r in rows if r["name"] == "MTL (fully trainable)")["wer"] is not None
    table = (out / "results.md").read_text()
    assert "| Setup 4: Dual-vector (proposed) (reference) |" in table and "| Setup 2: ASR-only vector |" in table
    assert table.index("| Setup 2: ASR-only vector |") < table.index("## Other merging methods") < table.index("| DARE")
    assert (out / "lambdas.png").read_bytes()[:4] == b"\x89PNG"
    base = torch_load(out / "base_wavlm_tiny.pt")
    assert base["adaltm_pretraining"]["objective"].startswith("masked prediction")       # pretrained, not random
    tasks, lambdas = read_lambdas(torch_load(out / "runs" / "dual_layerwise" / "dev-best.ckpt")["Upstream"])
    assert lambdas.shape == (base["cfg"]["encoder_layers"] + 1, 2)     # every layer group, CNN included, learned
    emr_states = torch_load(out / "runs" / "emr_layerwise" / "dev-best.ckpt")["Upstream"]
    assert emr_states["_extra_state"]["vector_ops"] == [{"name": "emr", "target": "ser"}]
    assert read_lambdas(emr_states)[1].shape == lambdas.shape             # the preset's method, λ per layer
    assert "rows in" in done.stdout
    score = json.loads((out / "classifier" / "test_score.json").read_text())     # issue 28: the exported model
    assert score["pipeline_accuracy"] == score["launcher_accuracy"] and score["n"] == len(
        (out / "runs" / "dual_layerwise" / "test_predictions.tsv").read_text().splitlines()) - 1
    assert "scored by `pipeline(\"audio-classification\")`" in table

    again = run_bounded([sys.executable, "-m", "adaltm_cli.main", "demo", "--quick", "--out", str(out)], 300,
                        cwd=ROOT, env=launcher_env())
    assert again.returncode == 0 and json.loads((out / "results.json").read_text()) == rows  # resumed, not redone
    other = run_bounded([sys.executable, "-m", "adaltm_cli.main", "demo", "--quick", "--corpus", "lexical", "--out",
                         str(out)], 120, cwd=ROOT, env=launcher_env())
    assert other.returncode == 2 and "holds a demo made with" in other.stderr and "choose another --out" in other.stderr


# Jobs for the pool (module functions: a spawned worker imports them by name).
LOGS = Path("demo/logs")


def square(x):
    return x * x


def sleep(seconds):
    time.sleep(seconds)


def fail(message):
    raise UserError(message)


def die():
    os._exit(9)


@pytest.mark.parametrize("workers", [1, 2])
def test_demo_jobs_hand_back_every_result(workers):
    bar = tqdm(total=5, file=io.StringIO())
    with JobPool(workers, bar, LOGS) as jobs:
        for x in range(5):
            jobs.submit(f"s{x}", square, x)
        got = dict(jobs.finished() for _ in range(5))
        assert jobs.pending == 0
    assert got == {f"s{x}": x * x for x in range(5)} and bar.n == 5
    with pytest.raises(UserError, match="runs/x: broken"), JobPool(workers, bar, LOGS) as jobs:
        jobs.submit("bad", fail, "runs/x: broken")
        jobs.finished()


def test_one_worker_stops_at_the_first_failing_job():
    ran = []
    with pytest.raises(UserError, match="runs/x: broken"), JobPool(1, tqdm(disable=True), LOGS) as jobs:
        jobs.submit("bad", fail, "runs/x: broken")
        ran.append("the next job")
    assert ran == []


def _live_group_members(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies, already dead, excepted)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and os.getpgid(int(entry.name)) == group
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                members.append(int(entry.name))
        except (ProcessLookupError, FileNotFoundError):
            pass
    return members


@pytest.mark.parametrize("receiver", ["group", "one_thread"])
def test_ctrl_c_reaches_only_the_demo_which_stops_its_workers(receiver):
    """Ctrl-C signals the whole process group: workers still importing torch must not print tracebacks. The kernel
    hands the demo's copy to any of its threads: `one_thread` sends it to a thread that is not the main one (which
    a wait without end never noticed: the demo hung in fresh-clone runs on a loaded machine)."""
    script = textwrap.dedent("""
        import faulthandler
        import signal
        import sys
        import threading
        from tqdm import tqdm
        from adaltm_recipes.demo.jobs import JobPool
        from tests.test_demo import LOGS, sleep
        faulthandler.register(signal.SIGUSR1, all_threads=True)   # where it waits, should it hang
        try:
            with JobPool(2, tqdm(disable=True), LOGS) as jobs:
                jobs.submit("a", sleep, 600)
                jobs.submit("b", sleep, 600)
                print("submitted", flush=True)
                if sys.argv[1] == "one_thread":
                    threading.Timer(1, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT)).start()
                jobs.finished()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, receiver], cwd=ROOT, env=launcher_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout.readline() == "submitted\n"
    if receiver == "group":
        time.sleep(1)                                   # the workers are starting: the window that printed most
        os.killpg(child.pid, signal.SIGINT)
    # a worker that outlived the demo would hold the output pipes open for its 600 s
    try:
        _, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGUSR1)
        time.sleep(2)
        os.killpg(child.pid, signal.SIGKILL)
        pytest.fail(f"the demo did not stop within 120 s of Ctrl-C; its threads:\n{child.communicate()[1][-6000:]}")
    assert child.returncode == 130 and err == "interrupted\n"
    deadline = time.monotonic() + 10                    # multiprocessing's resource tracker goes on its own
    while _live_group_members(child.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_group_members(child.pid) == []         # no worker outlived the demo


def test_demo_jobs_stop_the_workers_on_the_first_error():
    others, started = set(multiprocessing.active_children()), time.monotonic()   # earlier tests' children
    with pytest.raises(UserError, match="runs/x: broken"), JobPool(2, tqdm(disable=True), LOGS) as jobs:
        jobs.submit("slow", sleep, 120)
        jobs.submit("bad", fail, "runs/x: broken")
        jobs.finished()
    assert time.monotonic() - started < 60                                 # the sleeper was stopped, not awaited
    assert set(multiprocessing.active_children()) <= others
    with pytest.raises(UserError, match=r"demo/logs: a worker process of the demo died .*unfinished: gone$"), \
            JobPool(2, tqdm(disable=True), LOGS) as jobs:
        jobs.submit("gone", die)
        jobs.finished()
    with pytest.raises(UserError, match=r"worker process of the demo died .*unfinished: gone, next$"), \
            JobPool(2, tqdm(disable=True), LOGS) as jobs:
        jobs.submit("gone", die)
        wait(jobs.running)                              # the pool has found its worker dead
        jobs.submit("next", square, 2)


def test_demo_cli_refuses_zero_jobs_and_reports_ctrl_c_in_one_line(tmp_path, monkeypatch, capsys):
    from adaltm_cli.main import main
    from adaltm_recipes import demo, demo_corpus

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--jobs", "0", "--out", str(tmp_path / "d")])
    assert exit_.value.code == 2 and "--jobs" in capsys.readouterr().err and not (tmp_path / "d").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err == ("adaltm: interrupted (finished stages are kept: rerun `adaltm demo` to "
                                              "go on)\n")
    monkeypatch.setattr(demo_corpus, "make_corpus", interrupted)   # a command that does not resume says only that
    with pytest.raises(SystemExit) as exit_:
        main(["make-demo-corpus", str(tmp_path / "c")])
    assert exit_.value.code == 130 and capsys.readouterr().err == "adaltm: interrupted\n"


def test_lexical_condition_adds_word_cues_and_ambiguous_prosody_to_the_same_corpus():
    """Issue 29's corpus, checked without audio: the prosody condition's labels, speakers, splits and votes; half
    of the labelled utterances carry a word of their class, 30 % the prosody of another class."""
    sizes = {"Train": 2400, "Development": 300, "Test1": 300}
    prosody, lexical = plan_corpus(sizes, seed=7), plan_corpus(sizes, seed=7, condition="lexical")
    same = ("name", "split", "code", "voice", "votes")
    assert [[getattr(u, f) for f in same] for u in prosody] == [[getattr(u, f) for f in same] for u in lexical]
    every_word = {w for words in LEXICON.values() for w in words}
    assert all(u.emotion_word is None and not set(u.text.split()) & every_word for u in prosody)
    labelled = [u for u in lexical if u.code in LEXICON]
    assert all(u.emotion_word is None for u in lexical if u.code not in LEXICON)
    for code in LEXICON:
        of_class = [u for u in labelled if u.code == code]
        cued = [u for u in of_class if u.emotion_word]
        assert abs(len(cued) / len(of_class) - LEXICAL_SHARE) < 4 * (0.25 / len(of_class)) ** 0.5, code
        assert all(u.emotion_word in LEXICON[code] and u.text.split()[2] == u.emotion_word for u in cued)
    ambiguous = [u for u in labelled if u.prosody_of != u.code]
    assert abs(len(ambiguous) / len(labelled) - AMBIGUOUS_SHARE) < 0.03
    for u in labelled:
        profile = PROFILES[u.prosody_of]
        assert profile.pitch[0] <= u.prosody[0] <= profile.pitch[1] and u.prosody[3] == profile.pitch_range
    before = {u.name: u for u in prosody}
    assert all(u.prosody == before[u.name].prosody for u in labelled if u.prosody_of == u.code)
    assert plan_corpus({"Train": 50}, seed=1, out_of_domain=True, condition="lexical") == plan_corpus(
        {"Train": 50}, seed=1, out_of_domain=True)                      # the out-of-domain ASR corpus: unchanged
