"""The demo's stages: corpora, the pretrained base, fine-tunings, task vectors, the rows, task arithmetic, the λ
figure. Each is skipped when its output exists, so a rerun resumes; each writes its output to
`logs/<stage>.log` (`Demo.logged`). The launcher and the recipes run in Python, not as commands (`launch`: the
same code, without a Python start per stage). A `Demo` holds only paths and sizes, so its bound stages can be
handed to worker processes (`jobs`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import yaml

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_write_text
from adaltm_recipes.demo.plan import (
    ASR_HEAD,
    CLASSIFIER,
    EMOTION_HEAD,
    FULL,
    LAMBDA_RUNS,
    QUICK,
    REFERENCE_RUN,
    SOURCES,
    TASK_ARITHMETIC_RUN,
    UPSTREAM_CONFIGS,
    Row,
)
from adaltm_recipes.launch import LaunchFailed, run_downstream
from adaltm_s3prl.registration import packaged_config


class Demo:
    def __init__(self, out: Path, quick: bool, seed: int = 0, corpus: str = "prosody"):
        self.out, self.size, self.seed, self.quick = out, QUICK if quick else FULL, seed, quick
        self.condition = corpus   # `demo_corpus.CONDITIONS`: where the emotion is audible (the ASR corpus: neutral)
        settings, record = {"quick": quick, "seed": seed, "corpus": corpus}, out / "demo.json"
        if record.exists() and record.read_text().strip() != json.dumps(settings):
            raise UserError(f"{out}: holds a demo made with {record.read_text().strip()}; resuming it with "
                            f"{json.dumps(settings)} would mix the two: choose another --out")
        for sub in ("configs", "runs", "vectors", "logs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if not record.exists():
            atomic_write_text(record, json.dumps(settings) + "\n")
        self.corpus, self.ood = out / "corpus" / "MSP-Podcast", out / "corpus" / "ood-asr"
        self.base = out / "base_wavlm_tiny.pt"
        self.vectors = {name: out / "vectors" / f"{name}.safetensors" for name in SOURCES}
        self.head = out / "runs" / SOURCES["ser"] / "dev-best.ckpt"   # the frozen head of grid search, AdaMerging

    # -- plumbing ------------------------------------------------------------------------------------------
    def logged(self, stage: str, function: Callable, *args) -> object:
        """Run one stage with its output in logs/<stage>.log and return its result; on failure, say where to
        look."""
        log = self.out / "logs" / f"{stage}.log"
        with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            try:
                return function(*args)
            except LaunchFailed as failed:
                raise UserError(f"{log}: stage {stage} failed (exit {failed.code})") from None
            except UserError:
                raise
            except Exception as error:
                raise UserError(f"{log}: stage {stage} failed: {type(error).__name__}: {error}") from error

    def _config(self, name: str, downstream: str, steps: int, datarc: dict, **sections) -> Path:
        packaged = yaml.safe_load(packaged_config(downstream).read_text())
        packaged["runner"].update(total_steps=steps, eval_step=max(1, steps // 3), save_step=max(1, steps // 3),
                                  log_step=max(1, steps // 6), max_keep=1)
        # heads at 1e-2; every learning rate (heads, upstream, λ) decays linearly to 0: what a 100-step head needs
        packaged["optimizer"] = {"name": "DifferentialAdamW", "lr": 1e-2, "upstream_lr": 1e-3, "lambda_lr": 2e-2,
                                 "weight_decay": 0.01}
        packaged["scheduler"] = {"name": "linear_schedule_with_warmup", "num_warmup_steps": 0}
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
        atomic_write_text(path, yaml.safe_dump(packaged, sort_keys=False))
        return path

    def _upstream(self, setup: str, row: Row | None = None) -> Path:
        """configs/upstream/<setup>.yaml with the demo's base and vectors: a vector file is matched by its name
        (`/vectors/ser.safetensors` -> this demo's `vectors/ser.safetensors`); everything else is the paper's, or
        the row's `merge` keys."""
        config = yaml.safe_load((UPSTREAM_CONFIGS / f"{setup}.yaml").read_text())
        config["base"] = str(self.base)
        config["task_vectors"] = {task: str(self.vectors[Path(path).stem])
                                  for task, path in (config.get("task_vectors") or {}).items()}
        if row is not None and row.merge:
            config["merge"].update(dict(row.merge))
            setup = row.run
        path = self.out / "configs" / f"upstream_{setup}.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        return path

    def _train_and_test(self, run: str, upstream: list[str], downstream: str, config: Path,
                        test_root: Path | None = None) -> None:
        """Train, then evaluate `dev-best.ckpt` on the test split; skipped when the run's test metrics exist."""
        expdir = self.out / "runs" / run
        if (expdir / "test_metrics.json").exists():
            return
        run_downstream(["-m", "train", *upstream, "-d", downstream, "-c", str(config), "-p", str(expdir),
                        "--device", "cpu"])
        override = ["-o", f"config.downstream_expert.datarc.root={test_root}"] if test_root else []
        run_downstream(["-m", "evaluate", "-e", str(expdir / "dev-best.ckpt"), "-t", "test", *override,
                        "--device", "cpu"])

    # -- stages --------------------------------------------------------------------------------------------
    def corpora(self) -> None:
        from adaltm_recipes.demo_corpus import make_corpus

        for root, sizes, ood in ((self.corpus, self.size.corpus, False), (self.ood, self.size.ood_corpus, True)):
            if not (root / "Labels" / "labels_consensus.csv").exists():
                make_corpus(root, sizes, seed=self.seed + ood, out_of_domain=ood,
                            condition="prosody" if ood else self.condition)

    def pretrain(self) -> None:
        """The base: masked prediction of k-means units on the audio of the corpus's training split (labels and
        transcripts unread). Skipped when the base exists; an interrupted run resumes from `pretrain/`."""
        from adaltm_recipes.pretrain import PretrainSettings, pretrain, split_audio

        if not self.base.exists():
            pretrain(split_audio(self.corpus, "Train"), self.base, self.out / "pretrain",
                     PretrainSettings(steps=self.size.pretrain_steps, seed=self.seed))

    def finetune(self, name: str) -> None:
        """One of the three fine-tuned models (`name`: a key of SOURCES). The tiny base's CNN learned from a few
        minutes of pretraining, so unlike s3prl's wavlm (whose CNN stays frozen) the whole model is trained:
        adaltm_wavlm with no vectors and trainable weights (the task vectors then reach group 0, the CNN, as
        well)."""
        steps = self.finetune_steps(name)
        if name == "ser":
            downstream, sections = "msp_podcast_cat", EMOTION_HEAD
            datarc, test_root = {"root": str(self.corpus), "require_transcript": False}, None
        else:
            # the out-of-domain model trains on the other corpus and is tested, like every row, on this one's Test1
            downstream, sections = "msp_podcast_asr", ASR_HEAD
            in_domain = name == "asr_in_domain"
            datarc = {"root": str(self.corpus if in_domain else self.ood)}
            test_root = None if in_domain else self.corpus
        config = self._config(SOURCES[name], downstream, steps, datarc, **sections)
        self._train_and_test(SOURCES[name], ["-u", "adaltm_wavlm", "-g", str(self._upstream("mtl_from_base"))],
                             downstream, config, test_root=test_root)

    def extract(self) -> None:
        from adaltm_upstream import task_vectors

        for name, run in SOURCES.items():
            if not self.vectors[name].exists():
                tensors, meta = task_vectors.extract(self.base, self.out / "runs" / run / "dev-best.ckpt")
                task_vectors.save(self.vectors[name], tensors, meta)

    def finetune_steps(self, name: str) -> int:
        return self.size.finetune_steps if name == "ser" else self.size.asr_steps

    def row_steps(self, row: Row) -> int:
        # HarmoniFuse alternates ASR and SER batches: twice the steps gives each task as many as the others get
        return self.size.rows_steps * (2 if row.downstream == "harmonifuse" else 1)

    def uses_vectors(self, row: Row) -> bool:
        return bool(yaml.safe_load((UPSTREAM_CONFIGS / f"{row.setup}.yaml").read_text()).get("task_vectors"))

    def run_row(self, row: Row) -> None:
        datarc = {"root": str(self.corpus), "require_transcript": row.wer}
        extra = dict(ASR_HEAD) if row.wer else {}
        if row.downstream == "msp_podcast_adamerging":
            # test-time adaptation: λ learn from Test1's audio (labels unread), the SER model's head stays frozen
            datarc["splits"] = {"train": "Test1", "dev": "Development", "test": "Test1"}
            extra["adamerging"] = {"head": str(self.head)}
        else:
            extra.update(EMOTION_HEAD)
        if row.downstream == "harmonifuse":
            extra["fusion"] = {"variant": row.fusion, **({"prompt_dim": 32} if row.fusion == "extended" else {})}
        config = self._config(row.run, row.downstream, self.row_steps(row), datarc, **extra)
        self._train_and_test(row.run, ["-u", "adaltm_wavlm", "-g", str(self._upstream(row.setup, row))],
                             row.downstream, config)

    def task_arithmetic(self) -> dict:
        """One global λ for both in-domain vectors, chosen on dev by loss with the SER model's frozen featurizer
        and head (`adaltm grid-search`), then evaluated on Test1 at λ* only. Skipped when its grid.json exists."""
        from adaltm_recipes.grid_search import grid_search, parse_values

        out = self.out / "runs" / TASK_ARITHMETIC_RUN
        if not (out / "grid.json").exists():
            grid_search(self._upstream("dual_static"), self.head, parse_values(self.size.grid), out, split="dev",
                        select="loss", test_split="test", device="cpu")
        return json.loads((out / "grid.json").read_text())

    def classifier(self) -> dict:
        """The proposed row as a stock transformers classifier (`adaltm export --format hf-classifier`), scored on
        Test1 by `pipeline("audio-classification")`: its accuracy must be the launcher's. Skipped when its
        score exists."""
        import csv

        from adaltm_recipes.predict import export_and_score

        score_file = self.out / CLASSIFIER / "test_score.json"
        if not score_file.exists():
            expdir = self.out / "runs" / REFERENCE_RUN
            with open(expdir / "test_predictions.tsv", newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
            files, labels = [self.corpus / "Audios" / r["file"] for r in rows], [int(r["label"]) for r in rows]
            score = export_and_score(expdir, self.out / CLASSIFIER / "model", files, labels)
            launcher = json.loads((expdir / "test_metrics.json").read_text())
            atomic_write_text(score_file, json.dumps({
                "model": score["classifier"], "n": score["n"], "pipeline_accuracy": score["accuracy"],
                "pipeline_uar": score["uar"], "launcher_accuracy": launcher["accuracy"],
                "launcher_uar": launcher["uar"]}, indent=1) + "\n")
        return json.loads(score_file.read_text())

    def lambdas_figure(self) -> Path:
        from adaltm_upstream.plotting import plot_lambdas

        return plot_lambdas([str(self.out / "runs" / r) for r in LAMBDA_RUNS.values()], self.out / "lambdas.png",
                            labels=list(LAMBDA_RUNS))
