"""The merging methods the field compares against, as pure tensor functions: EMR-merging (`emr`), dataless
Localize-and-Stitch (`localize_stitch`), TSV-Merge (`tsv`), Iso-C and Iso-CTS (`iso`) and TIES with its sign
election and trimming over the whole model as FusionBench does it (`ties_model`).

Every method rewrites the task vectors τ_t into shares τ'_t such that the linear merge
W = W_base + Σ_t λ_t τ'_t reproduces the method at equal λ_t = 1 (or at its scaling factor α for methods that
have one), so it composes with every λ table. A method that needs statistics over the whole model (EMR's
rescalers, a global top-k threshold, TIES' zero-sign majority) computes them from a stream of (tensor name, one
tensor per task) pairs that it iterates once per pass: passes hold one name's tensors at a time, never the model.
Each method's module states its source, its differences from that source and its rule for 1-D tensors and for
the weight-normed positional convolution (g and v as stored by transformers).
"""
