"""`adaltm demo`: the whole paper, end to end, on the espeak corpus and a tiny WavLM, on a laptop CPU.

Stages (each skipped when its output exists, so a rerun resumes): corpora -> a pretrained base (6-layer WavLM,
HuBERT-style masked prediction of k-means units on the corpus's training audio, `adaltm_recipes.pretrain`; an
interrupted pretraining resumes from its own state) -> fine-tune the in-domain ASR, out-of-domain ASR and SER
models through the real launcher -> extract three task vectors -> every row of Table 1 through the real launcher
(train, then evaluate `dev-best.ckpt` on Test1) -> the other merging methods (TIES, DARE, task arithmetic by grid
search, label-free AdaMerging) and HarmoniFuse's extended fusion -> results.md, results.json, lambdas.png.

One module per job: `plan` (sizes, recipes, the rows of the tables), `stages` (what each stage does), `jobs` (the
worker pool), `report` (the tables), `run` (the order of it all).
"""

from adaltm_recipes.demo.run import run_demo

__all__ = ["run_demo"]
