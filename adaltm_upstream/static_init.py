"""The MTL baseline "static init" (`merge.train_merged_weights: true`): start from W_base + Σ_t λ_t τ'_t at
merge.init and train every weight like a fine-tuning (with no task vectors: "MTL fully trainable").

The merged weights are computed group by group with the same `fill_group` / `merge_group` as the λ upstream and
export, then become the backbone's ordinary parameters; nothing of the merge stays in memory. Dropout is on while
training. Its states carry every backbone weight as `backbone.model.<canonical name>` plus the architecture
(~1.3 GB for WavLM-Large): a valid `--finetuned` source for `adaltm task-vector extract`, and what `adaltm
export --states` writes for such a run (`trained_groups`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from adaltm_core.errors import UserError
from adaltm_upstream import sources as merge_sources
from adaltm_upstream.checkpoints import Checkpoint, load_checkpoint
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.expert import WavLMUpstream
from adaltm_upstream.merging import fill_group, layout, merge_group
from adaltm_upstream.methods.constraints import constrain
from adaltm_upstream.task_vectors import TaskVector


def initial_weights(sources: merge_sources.MergeSources) -> dict[str, torch.Tensor]:
    """W_base + Σ_t λ_t τ'_t at merge.init (through the constraints), one new tensor per canonical name."""
    table, vectors = sources.table(), sources.pipeline()
    lambdas = constrain(table.initial(sources.init), sources.config.merge.constraints)
    weights: dict[str, torch.Tensor] = {}
    for g, slots in enumerate(layout(sources.groups, sources.base.state)):
        base, tau = fill_group(slots, sources.base.state, vectors, sources.vector_dtype)
        with torch.no_grad():
            merged = merge_group(base, tau, table.for_group(lambdas, g), slots)
        weights.update({name: tensor.clone() for name, tensor in merged.items()})
    return weights


class MergedWeightsUpstream(WavLMUpstream):
    def __init__(self, config: UpstreamConfig, base: Checkpoint | None = None,
                 vectors: list[TaskVector] | None = None):
        sources = merge_sources.load(config, base, vectors)
        super().__init__(config, sources.fingerprint)
        self._set_backbone(sources.base, initial_weights(sources))
        self.backbone.requires_grad_(True)
        self.register_load_state_dict_pre_hook(_drop_earlier_merge_state)

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        return self._outputs(wavs, None)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "architecture": self.backbone.config.to_dict(),
                "normalize": self.backbone.normalize}

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The backbone's current weights, by canonical name."""
        return {name: p.detach().clone() for name, p in self.backbone.model.state_dict().items()}


def _drop_earlier_merge_state(module, state: dict, prefix: str, *args) -> None:
    """States written before this upstream had a class of its own also hold the (unused) merge's λ."""
    for key in [k for k in state if k.startswith(prefix + "merge.")]:
        del state[key]


def trained_groups(states_path: str, groups: list[list[str]]) -> Iterator[dict[str, torch.Tensor]]:
    """The trained weights of such a run, one layer group at a time (what `adaltm export --states` writes)."""
    trained = load_checkpoint(states_path, check_values=False)
    missing = next((name for names in groups for name in names if name not in trained.state), None)
    if missing is not None:
        raise UserError(f"{states_path}: no trained weight {missing} in these states")
    for names in groups:
        yield {name: trained.state[name] for name in names}
