"""`adaltm demo`: the whole paper, end to end, on the espeak corpus and a tiny WavLM, on a laptop CPU.

Stages (each skipped when its output exists, so a rerun resumes): corpora -> tiny "pretrained" base (random
init, written as a real unilm checkpoint) -> fine-tune the in-domain ASR, out-of-domain ASR and SER models
through the real launcher -> extract three task vectors with the real CLI -> every row of Table 1 through the
real launcher (train, then evaluate `dev-best.ckpt` on Test1) -> results.md, results.json, lambdas.png.
The launcher and the CLI run in this process (same code as the commands, without a Python start per stage);
each stage's output goes to `logs/<stage>.log`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from adaltm_core.errors import UserError
from adaltm_downstream.common import results
from adaltm_s3prl.registration import packaged_config

# The paper's setups as users run them: the Table-1 configs of configs/upstream/, with the demo's files swapped in.
UPSTREAM_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "upstream"


@dataclass(frozen=True)
class Size:
    corpus: dict[str, int]
    ood_corpus: dict[str, int]
    finetune_steps: int
    asr_steps: int
    rows_steps: int
    batch: int


FULL = Size({"Train": 600, "Development": 120, "Test1": 160}, {"Train": 300, "Development": 60, "Test1": 60},
            finetune_steps=400, asr_steps=450, rows_steps=150, batch=16)
QUICK = Size({"Train": 160, "Development": 48, "Test1": 64}, {"Train": 100, "Development": 24, "Test1": 24},
             finetune_steps=60, asr_steps=60, rows_steps=24, batch=16)


# The emotion head of every demo row: the paper's head with one hidden layer (the tiny model's pooled features
# are weak, a purely linear head learns them too slowly for a few-minute demo).
EMOTION_HEAD = {"emotion": {"projector_dim": 128, "hidden_dim": 128}}


@dataclass(frozen=True)
class Row:
    name: str
    run: str                              # experiment directory under runs/; rows sharing one run share its result
    setup: str                            # configs/upstream/<setup>.yaml
    downstream: str = "msp_podcast_cat"

    @property
    def wer(self) -> bool:
        return self.downstream != "msp_podcast_cat"


# Table 1, in the paper's order.
ROWS = (
    Row("MTL (fully trainable)", "mtl_full", "mtl_from_base", "msp_podcast_mtl"),
    Row("MTL w/ static init (W_base + 0.5ΔW)", "mtl_static_init", "mtl_static_init", "msp_podcast_mtl"),
    Row("Setup 1: Baseline (frozen backbone)", "setup1_baseline", "baseline"),
    Row("Setup 2: ASR-only vector", "setup2_asr_only", "asr_only"),
    Row("Setup 3: SER-only vector", "setup3_ser_only", "ser_only"),
    Row("Setup 4: Dual-vector (proposed)", "dual_layerwise", "dual_layerwise"),
    Row("Out-of-domain dual vectors", "dual_out_of_domain", "dual_out_of_domain"),
    Row("Static global merging (λ = 0.5)", "dual_static", "dual_static"),
    Row("Adaptive global merging", "dual_global", "dual_global"),
    Row("Adaptive layer-wise merging (ours)", "dual_layerwise", "dual_layerwise"),
    Row("HarmoniFuse (fine-tuned backbone)", "harmonifuse", "mtl_from_base", "harmonifuse"),
)
# Task-vector file name (as the Table-1 configs name them) -> the fine-tuning run it is extracted from.
SOURCES = {"asr_in_domain": "finetune_asr_in_domain", "asr_out_of_domain": "finetune_asr_out_of_domain",
           "ser": "finetune_ser"}


def _base_config() -> dict:
    from transformers import WavLMConfig

    return WavLMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                       conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                       feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
                       num_conv_pos_embedding_groups=4, hidden_dropout=0.1, attention_dropout=0.1,
                       activation_dropout=0.0, feat_proj_dropout=0.0, mask_time_prob=0.05)


def write_tiny_base(path: Path, seed: int) -> Path:
    """A randomly initialised tiny WavLM (transformers' initialisation), saved in microsoft/unilm format."""
    from transformers import WavLMModel

    from adaltm_upstream.export import write_unilm_checkpoint

    torch.manual_seed(seed)
    config = _base_config()
    model = WavLMModel(config)
    return write_unilm_checkpoint(path, config, True, model.state_dict())


class Demo:
    def __init__(self, out: Path, quick: bool, seed: int = 0):
        self.out, self.size, self.seed, self.quick = out, QUICK if quick else FULL, seed, quick
        for sub in ("configs", "runs", "vectors", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.corpus, self.ood = out / "corpus" / "MSP-Podcast", out / "corpus" / "ood-asr"
        self.base = out / "base_wavlm_tiny.pt"
        self.vectors = {name: out / "vectors" / f"{name}.safetensors" for name in SOURCES}

    # -- plumbing ------------------------------------------------------------------------------------------
    def _logged(self, stage: str, function, *args) -> None:
        """Run one stage with its output in logs/<stage>.log; on failure, say where to look."""
        log = self.out / "logs" / f"{stage}.log"
        with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            try:
                function(*args)
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    raise UserError(f"{log}: stage {stage} failed (exit {exit_.code})") from None
            except UserError:
                raise
            except Exception as error:
                raise UserError(f"{log}: stage {stage} failed: {type(error).__name__}: {error}") from error

    def _launch(self, argv: list[str]) -> None:
        from adaltm_s3prl import launcher

        saved = sys.argv
        try:
            launcher.main(argv + ["--device", "cpu"])
        finally:
            sys.argv = saved

    def _config(self, name: str, downstream: str, steps: int, datarc: dict, **sections) -> Path:
        packaged = yaml.safe_load(packaged_config(downstream).read_text())
        packaged["runner"].update(total_steps=steps, eval_step=max(1, steps // 3), save_step=max(1, steps // 3),
                                  log_step=max(1, steps // 6), max_keep=1)
        packaged["optimizer"] = {"name": "DifferentialAdamW", "lr": 2e-3, "upstream_lr": 1e-3, "lambda_lr": 2e-2,
                                 "weight_decay": 0.01}
        expert = packaged["downstream_expert"]
        # bucket_window 0 for emotion: in this corpus the speaking rate is part of the emotion, so length-sorted
        # batches would be single-class batches; ASR alone buckets as usual
        common = {"splits": {"train": "Train", "dev": "Development", "test": "Test1"}, "num_workers": 0,
                  "batch_size": self.size.batch, "batch_seconds": None, "eval_batch_size": 32,
                  "bucket_window": 100 if downstream == "msp_podcast_asr" else 0, **datarc}
        for key in [k for k in expert if k.endswith("datarc") or k.endswith("_data")]:
            expert[key].update(common)
        for section, values in sections.items():
            expert.setdefault(section, {}).update(values)
        path = self.out / "configs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(packaged, sort_keys=False))
        return path

    def _upstream(self, setup: str) -> Path:
        """configs/upstream/<setup>.yaml with the demo's base and vectors: a vector file is matched by its name
        (`/vectors/ser.safetensors` -> this demo's `vectors/ser.safetensors`); everything else is the paper's."""
        config = yaml.safe_load((UPSTREAM_CONFIGS / f"{setup}.yaml").read_text())
        config["base"] = str(self.base)
        config["task_vectors"] = {task: str(self.vectors[Path(path).stem])
                                  for task, path in (config.get("task_vectors") or {}).items()}
        path = self.out / "configs" / f"upstream_{setup}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _train_and_test(self, run: str, upstream: list[str], downstream: str, config: Path,
                        test_root: Path | None = None) -> None:
        """Train, then evaluate `dev-best.ckpt` on the test split; skipped when the run's test metrics exist."""
        expdir = self.out / "runs" / run
        if (expdir / "test_metrics.json").exists():
            return
        self._launch(["-m", "train", *upstream, "-d", downstream, "-c", str(config), "-p", str(expdir)])
        override = ["-o", f"config.downstream_expert.datarc.root={test_root}"] if test_root else []
        self._launch(["-m", "evaluate", "-e", str(expdir / "dev-best.ckpt"), "-t", "test", *override])

    # -- stages --------------------------------------------------------------------------------------------
    def corpora(self) -> None:
        from adaltm_recipes.demo_corpus import make_corpus

        for root, sizes, ood in ((self.corpus, self.size.corpus, False), (self.ood, self.size.ood_corpus, True)):
            if not (root / "Labels" / "labels_consensus.csv").exists():
                make_corpus(root, sizes, seed=self.seed + ood, out_of_domain=ood)
        if not self.base.exists():
            write_tiny_base(self.base, self.seed)

    def finetune(self) -> None:
        """The three fine-tuned models. A random tiny base has no useful CNN, so unlike s3prl's wavlm (whose CNN
        stays frozen) the whole model is trained: adaltm_wavlm with no vectors and trainable weights."""
        local = ["-u", "adaltm_wavlm", "-g", str(self._upstream("mtl_from_base"))]
        asr = {"asr": {"projector_dim": 128, "lstm_layers": 0, "dropout": 0.0}}

        def train(name: str, downstream: str, steps: int, datarc: dict, test_root: Path | None = None, **sections):
            run = SOURCES[name]
            config = self._config(run, downstream, steps, datarc, **sections)
            self._train_and_test(run, local, downstream, config, test_root=test_root)

        train("asr_in_domain", "msp_podcast_asr", self.size.asr_steps, {"root": str(self.corpus)}, **asr)
        train("asr_out_of_domain", "msp_podcast_asr", self.size.asr_steps, {"root": str(self.ood)},
              test_root=self.corpus, **asr)
        train("ser", "msp_podcast_cat", self.size.finetune_steps,
              {"root": str(self.corpus), "require_transcript": False}, **EMOTION_HEAD)

    def extract(self) -> None:
        from adaltm_upstream import task_vectors

        for name, run in SOURCES.items():
            if not self.vectors[name].exists():
                tensors, meta = task_vectors.extract(self.base, self.out / "runs" / run / "dev-best.ckpt")
                task_vectors.save(self.vectors[name], tensors, meta)

    def run_row(self, row: Row) -> None:
        datarc = {"root": str(self.corpus), "require_transcript": row.downstream != "msp_podcast_cat"}
        extra = {"asr": {"projector_dim": 128, "lstm_layers": 0, "dropout": 0.0}} if row.wer else {}
        extra.update(EMOTION_HEAD)
        if row.downstream == "harmonifuse":
            extra["fusion"] = {"prompt_dim": 32}
        # HarmoniFuse alternates ASR and SER batches: twice the steps gives each task as many as the others get
        steps = self.size.rows_steps * (2 if row.downstream == "harmonifuse" else 1)
        config = self._config(row.run, row.downstream, steps, datarc, **extra)
        self._train_and_test(row.run, ["-u", "adaltm_wavlm", "-g", str(self._upstream(row.setup))],
                             row.downstream, config)

    def lambdas_figure(self) -> Path:
        from adaltm_upstream.plotting import plot_lambdas

        runs = {"dual (in-domain)": "dual_layerwise", "ASR-only": "setup2_asr_only", "SER-only": "setup3_ser_only",
                "dual (out-of-domain ASR)": "dual_out_of_domain"}
        return plot_lambdas([str(self.out / "runs" / r) for r in runs.values()], self.out / "lambdas.png",
                            labels=list(runs))


# The fine-tuned models' own rows, above Table 1's; the proposed row is the reference for significance marks.
MODEL_ROWS = (("ASR model, in-domain (fine-tuned on the corpus)", "finetune_asr_in_domain"),
              ("ASR model, out-of-domain (LibriSpeech role)", "finetune_asr_out_of_domain"),
              ("SER model (fine-tuned)", "finetune_ser"))
REFERENCE_RUN = "dual_layerwise"


def _json_row(row: results.TableRow) -> dict:
    """The contract's results.json row; null where a metric does not apply."""
    return {"name": row.name, **{m: row.values.get(m) for m in (*results.SHOWN, "wer")},
            "ci95": {m: row.ci95[m] for m in results.SHOWN} if row.ci95 else None}


def _line(row: results.TableRow) -> str:
    cells = ", ".join(f"{results.HEADERS[m]} {results.cell(row, m, 'md')}" for m in (*results.SHOWN, "wer")
                      if row.values.get(m) is not None)
    return f"  {row.name}: {cells}"


def run_demo(out: str | Path = "results/demo", quick: bool = False, seed: int = 0) -> list[dict]:
    """Everything; returns the results rows. Resumable: finished stages are skipped."""
    started = time.time()
    logging.getLogger().addHandler(logging.NullHandler())  # keep s3prl's basicConfig off our terminal
    demo = Demo(Path(out).resolve(), quick, seed)  # the configs it writes hold paths; a relative one would break
    stages = 4 + len({row.run for row in ROWS})
    bar = tqdm(total=stages, desc="adaltm demo", unit="stage", file=sys.stderr, dynamic_ncols=True)
    done: set[str] = set()

    def step(label: str, function, *args):
        bar.set_postfix_str(label)
        result = {}
        demo._logged(label, lambda: result.setdefault("value", function(*args)))
        bar.update(1)
        return result.get("value")

    step("corpora", demo.corpora)
    step("finetune", demo.finetune)
    step("extract", demo.extract)
    entries = list(MODEL_ROWS)
    for row in ROWS:
        if row.run not in done:
            step(row.run, demo.run_row, row)
            done.add(row.run)
        entries.append((row.name, row.run))
    step("lambdas", demo.lambdas_figure)
    bar.close()

    runs = [results.load_run(demo.out / "runs" / run, "test", name) for name, run in entries]
    reference = results.load_run(demo.out / "runs" / REFERENCE_RUN, "test", "Adaptive layer-wise merging (ours)")
    rows = results.table_rows(runs, reference)
    for row in rows:
        tqdm.write(_line(row), file=sys.stderr)
    table = results.render(rows, "md") + "\n" + results.legend(reference, 1000, "utterance")
    minutes = (time.time() - started) / 60
    header = (f"# AdaLTM demo ({'quick' if quick else 'full'}): Table 1 on the espeak corpus, tiny WavLM\n\n"
              f"Test set: Test1 of the demo corpus; chance UAR = 12.5. Wall time of this invocation "
              f"{minutes:.1f} min.\n\n")
    (demo.out / "results.md").write_text(header + table + "\n\n![λ per layer](lambdas.png)\n")
    rows_json = [_json_row(row) for row in rows]
    (demo.out / "results.json").write_text(json.dumps(rows_json, indent=1) + "\n")
    print(table)
    print(f"adaltm demo: {len(rows)} rows in {minutes:.1f} min -> {demo.out / 'results.md'}, "
          f"{demo.out / 'results.json'}, {demo.out / 'lambdas.png'}")
    return rows_json
