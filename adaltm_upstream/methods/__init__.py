"""Merging methods: task-vector operations and λ constraints, one module each, registered by name (`registry`).

`base` (the interface), `registry` (names → classes; the config's lists), `pipeline` (the operations fitted to
the vectors: τ → τ'), `trim`, `ties`, `dare`, `constraints` (clamp, softmax, sum_to_one), and the methods the field
compares against: `emr` (EMR-merging), `localize_stitch` (dataless Localize-and-Stitch), `tsv` (TSV-Merge), `iso`
(Iso-C, Iso-CTS) and `ties_model` (TIES over the whole model, as FusionBench runs it: `ties` with `scope: model`);
`selection` (the exact streamed global top-k) and `tensors` (stacking, fixed threads) serve them.

Every operation rewrites the task vectors τ_t into shares τ'_t such that the linear merge W = W_base + Σ_t λ_t τ'_t
gives the method at equal λ_t (1, or the method's scaling factor α), so it composes with every λ table. Whole-model
statistics (EMR's rescalers, a global top-k threshold, TIES' zero-sign majority) come from passes over the vectors
streamed one name at a time, never the whole model at once. Each module states its source, its differences from
that source and its rule for 1-D tensors and for the weight-normed positional convolution (g and v as stored).
"""
