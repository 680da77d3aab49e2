"""The paper's layer groups (eq. 4): 0 = everything outside the transformer blocks, l = transformer layer l.

Two tensors the paper does not name:
- `encoder.layer_norm` (the encoder's own LayerNorm). With `encoder_norm_group: adjacent` (default) it joins the
  layer it normalises: in pre-LN WavLM-Large it is applied to the 24th layer's output, so it goes with group L;
  in post-LN Base it normalises the input of the first layer, together with the positional convolution, so it
  goes with group 0. `outside` puts it in group 0 for every architecture.
- `masked_spec_embed` (SpecAugment's mask vector): group 0. It never enters our forward (masking is off), so its
  coefficient cannot change any hidden state; it is kept so exported checkpoints are complete.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def group_of(name: str, num_layers: int, stable_layer_norm: bool, encoder_norm_group: str = "adjacent") -> int:
    match = _LAYER.match(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith("encoder.layer_norm.") and encoder_norm_group == "adjacent" and stable_layer_norm:
        return num_layers
    return 0


def partition(names, num_layers: int, stable_layer_norm: bool,
              encoder_norm_group: str = "adjacent") -> list[list[str]]:
    """Canonical names grouped 0..L, each group in the given order."""
    groups: list[list[str]] = [[] for _ in range(num_layers + 1)]
    for name in names:
        groups[group_of(name, num_layers, stable_layer_norm, encoder_norm_group)].append(name)
    return groups
