"""What `adaltm demo` runs: the size presets, the recipe of every run, and the rows of its two tables.

Data only; `stages` carries it out and `report` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The paper's setups as users run them: the Table-1 configs of configs/upstream/, with the demo's files swapped in.
UPSTREAM_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "upstream"


@dataclass(frozen=True)
class Size:
    corpus: dict[str, int]
    ood_corpus: dict[str, int]
    pretrain_steps: int
    finetune_steps: int
    asr_steps: int
    rows_steps: int
    batch: int
    grid: str                             # the λ values of the task-arithmetic grid (`adaltm grid-search --values`)


# FULL: the training and dev audio docs/demo_pretraining.md measured the base on (1,200 / 200 utterances; the
# corpus draws splits in order, so a longer Test1 leaves them unchanged), 900 test utterances for 95 % intervals of
# about ±4 UAR points, and the steps that fit in 15 minutes on 2 cores (13 measured). QUICK: every stage runs,
# nothing is meant to be learned.
FULL = Size({"Train": 1200, "Development": 200, "Test1": 900}, {"Train": 300, "Development": 60, "Test1": 60},
            pretrain_steps=600, finetune_steps=200, asr_steps=120, rows_steps=100, batch=16, grid="0:1:0.1")
QUICK = Size({"Train": 120, "Development": 32, "Test1": 48}, {"Train": 60, "Development": 16, "Test1": 16},
             pretrain_steps=40, finetune_steps=16, asr_steps=16, rows_steps=12, batch=16, grid="0.2,0.6,1")


# The emotion head of every demo row: the paper's (linear) head. With the learning rates of `stages` it learns a
# frozen base in 100 steps: the baseline's test UAR is 30-32 over five head seeds; with a hidden layer of 128, lr
# 2e-3 and no decay it was 21-23 (two seeds), while a logistic regression on the same features reaches 47.
EMOTION_HEAD = {"emotion": {"projector_dim": 128}}
# The ASR head of the fine-tuned ASR models and of the rows that also report WER.
ASR_HEAD = {"asr": {"projector_dim": 128, "lstm_layers": 0, "dropout": 0.0}}


@dataclass(frozen=True)
class Row:
    name: str
    run: str                              # experiment directory under runs/; rows sharing one run share its result
    setup: str                            # configs/upstream/<setup>.yaml
    downstream: str = "msp_podcast_cat"
    fusion: str = "paper"                 # harmonifuse only: `fusion.variant`
    merge: tuple[tuple[str, object], ...] = ()   # replaces these keys of the setup's `merge` (e.g. granularity)

    @property
    def wer(self) -> bool:
        return self.downstream in ("msp_podcast_mtl", "harmonifuse")


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
    Row("HarmoniFuse (fine-tuned backbone, paper fusion)", "harmonifuse", "mtl_from_base", "harmonifuse"),
)
# Methods the paper does not compare (issues 15 and 16), below Table 1; task arithmetic is the grid-search stage.
EXTRA_ROWS = (
    Row("TIES-merging (top 20 %, static λ = 0.5)", "dual_ties", "dual_ties"),
    Row("DARE (p = 0.5, static λ = 0.5)", "dual_dare", "dual_dare"),
    # issue 27: the methods the field compares against, at λ = 0.5 like the rows above, and with λ learned per layer
    # from the method's own λ = 1 where each task keeps a share of its own (EMR, TSV-Merge)
    Row("TIES over the whole model (FusionBench's: top 20 %, disjoint sum, static λ = 0.5)", "ties_fusionbench",
        "dual_ties_fusionbench", merge=(("init", 0.5),)),
    Row("EMR-merging for SER (static λ = 0.5)", "emr_static", "dual_emr", merge=(("init", 0.5),)),
    Row("EMR-merging for SER (layer-wise λ from 1)", "emr_layerwise", "dual_emr",
        merge=(("granularity", "layerwise"),)),
    Row("Localize-and-Stitch, dataless (top 10 %, static λ = 0.5)", "localize_stitch", "dual_localize_stitch",
        merge=(("init", 0.5),)),
    Row("TSV-Merge (static λ = 0.5)", "tsv_static", "dual_tsv", merge=(("init", 0.5),)),
    Row("TSV-Merge (layer-wise λ from 1)", "tsv_layerwise", "dual_tsv", merge=(("granularity", "layerwise"),)),
    Row("Iso-C (static λ = 0.5)", "iso_c", "dual_iso_c", merge=(("init", 0.5),)),
    Row("Iso-CTS (static λ = 0.5)", "iso_cts", "dual_iso_cts", merge=(("init", 0.5),)),
    Row("AdaMerging, label-free (tensorwise λ, SER model's frozen head)", "adamerging", "dual_adamerging",
        "msp_podcast_adamerging"),
    Row("HarmoniFuse (fine-tuned backbone, extended fusion: ours)", "harmonifuse_extended", "mtl_from_base",
        "harmonifuse", fusion="extended"),
)
TASK_ARITHMETIC_RUN = "task_arithmetic"
# Task-vector file name (as the Table-1 configs name them) -> the fine-tuning run it is extracted from.
SOURCES = {"asr_in_domain": "finetune_asr_in_domain", "asr_out_of_domain": "finetune_asr_out_of_domain",
           "ser": "finetune_ser"}
# The fine-tuned models' own rows, above Table 1's; the proposed row is the reference for significance marks.
MODEL_ROWS = (("ASR model, in-domain (fine-tuned on the corpus)", "finetune_asr_in_domain"),
              ("ASR model, out-of-domain (LibriSpeech role)", "finetune_asr_out_of_domain"),
              ("SER model (fine-tuned)", "finetune_ser"))
REFERENCE_RUN = "dual_layerwise"
# The proposed row exported as a transformers classifier (issue 28), scored on Test1 by `pipeline(...)`.
CLASSIFIER = "classifier"
# The λ figure: one line per task of each of these runs.
LAMBDA_RUNS = {"dual (in-domain)": "dual_layerwise", "ASR-only": "setup2_asr_only", "SER-only": "setup3_ser_only",
               "dual (out-of-domain ASR)": "dual_out_of_domain"}
