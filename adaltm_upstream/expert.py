"""The s3prl upstream `adaltm_wavlm`: a frozen WavLM base, frozen task vectors, learnable λ per layer group.

Data in: a list of 16 kHz waveforms (s3prl's upstream contract). Transformed: `GroupedMerge` builds the merged
weights from λ, `WavLMBackbone` runs them. Out: `hidden_states` for s3prl's weighted-sum featurizer.

What s3prl sees of it:
- trainable parameters: λ only (`merge.coefficients`); everything frozen is a non-persistent buffer or a frozen
  parameter that DDP is told to ignore (never broadcast);
- `state_dict()`: λ (`merge.coefficients`) and, as extra state, their full (rows × tasks) matrix, the task
  names, the granularity, the method records and a fingerprint of base + vectors + methods — never the frozen
  tensors; loading states whose fingerprint, tasks, granularity or methods differ from the config's is refused;
- `train()`: the backbone stays in eval mode (frozen-backbone semantics: no dropout while λ trains).
The MTL baseline "static init", whose merged weights train themselves, is its own upstream (`static_init`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed import get_rank, is_initialized
from torch.nn.parallel import DistributedDataParallel

from adaltm_upstream import sources as merge_sources
from adaltm_upstream import states
from adaltm_upstream.backbone import WavLMBackbone
from adaltm_upstream.checkpoints import Checkpoint
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.merging import GroupedMerge
from adaltm_upstream.task_vectors import TaskVector

LOG_EVERY = 20  # training forwards between two λ points in tensorboard


class WavLMUpstream(nn.Module):
    """What every `adaltm_wavlm` shares: s3prl's upstream interface around a `WavLMBackbone`, the states'
    fingerprint and their check on loading."""

    def __init__(self, config: UpstreamConfig, fingerprint: str):
        super().__init__()
        self.config = config
        self.tasks = config.tasks
        self.fingerprint = fingerprint

    def _set_backbone(self, base: Checkpoint, weights: Mapping[str, torch.Tensor]) -> None:
        """The backbone of `base`'s architecture on `weights`, as the config's `hidden_states` and `speed` say."""
        speed = self.config.speed
        self.backbone = WavLMBackbone(base.config, base.normalize, self.config.hidden_states,
                                      attention=speed.attention, weights=weights, length_groups=speed.length_groups)
        if speed.compile:
            self.backbone.compile_encoder()

    # -- s3prl's upstream interface -------------------------------------------------------------------------
    def get_downsample_rates(self, key: str) -> int:
        return math.prod(self.backbone.config.conv_stride)

    def _outputs(self, wavs: list[torch.Tensor], params: dict[str, torch.Tensor] | None) -> dict:
        hidden = self.backbone(wavs, params=params).hidden_states
        result = {"hidden_states": hidden, "last_hidden_state": hidden[-1]}
        result.update({f"hidden_state_{i}": s for i, s in enumerate(hidden)})
        return result

    # -- checkpoints ---------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return states.extra_state(self.config, self.fingerprint)

    def set_extra_state(self, state: dict) -> None:
        """Runs before the children's states load, so a mismatch is refused before any λ changes."""
        states.check_states(state, self.fingerprint, self.config)


class AdaLTMUpstream(WavLMUpstream):
    def __init__(self, config: UpstreamConfig, base: Checkpoint | None = None,
                 vectors: list[TaskVector] | None = None):
        """`base` and `vectors` default to the files the config names (benchmarks pass them in memory)."""
        sources = merge_sources.load(config, base, vectors)
        super().__init__(config, sources.fingerprint)
        # Base and vectors stream from their files straight into the merge's flat buffers; the backbone's
        # parameters are views of the base buffers. Peak: the buffers plus one tensor in flight.
        merge = GroupedMerge(sources.base.state, sources.pipeline(), sources.groups,
                             sources.table(frozenset({0}) if config.speed.freeze_group0 else frozenset()),
                             sources.init, config.merge.constraints, sources.vector_dtype)
        self._set_backbone(sources.base, merge.base_views())
        self.backbone.requires_grad_(False)
        self.merge = merge  # after the backbone: optimizer states of resumed runs address parameters by position
        self.backbone.register_state_dict_post_hook(_drop_frozen_backbone)
        self.register_load_state_dict_post_hook(_frozen_backbone_not_missing)
        frozen = [n for n, _ in self.named_parameters() if n != "merge.coefficients"]
        frozen += [n for n, _ in self.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)
        self.log_step = 0
        self._writer = None
        self._expdir: str | None = None

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        params = None
        if self.merge.num_tasks:
            # λ and the merge's accumulation stay fp32 under any autocast (addmv would otherwise run in bf16/fp16)
            with torch.autocast(self.merge.fixed.device.type, enabled=False):
                params = self.merge()
        result = self._outputs(wavs, params)
        if self.training and torch.is_grad_enabled():
            self.log_step += 1
            if self.log_step == 1 or self.log_step % LOG_EVERY == 0:
                self._log_lambdas()
        return result

    def train(self, mode: bool = True) -> AdaLTMUpstream:
        super().train(mode)
        self.backbone.eval()
        return self

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "log_step": self.log_step}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.log_step = int(state.get("log_step", 0))

    def attach_experiment(self, expdir: str) -> None:
        """Called by the launcher's runner hook so λ can be logged next to the runner's own tensorboard."""
        self._expdir = expdir

    def lambdas(self) -> torch.Tensor:
        """λ as merged (after merge.constraints), (rows × tasks): rows are groups, or tensors for tensorwise."""
        return self.merge.effective_lambdas().detach()

    def merged_state(self) -> dict[str, torch.Tensor]:
        """Canonical merged weights at the current λ (what `adaltm export` writes)."""
        with torch.no_grad():
            merged = self.merge() if self.merge.num_tasks else {}
            return {name: merged.get(name, p).detach().clone()
                    for name, p in self.backbone.model.state_dict().items()}

    def _log_lambdas(self) -> None:
        if self._expdir is None or self.merge.num_tasks == 0 or (is_initialized() and get_rank() != 0):
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self._expdir, filename_suffix=".adaltm")
        lambdas, table = self.lambdas().cpu(), self.merge.table
        for t, task in enumerate(self.tasks):
            for g, rows in enumerate(table.row_slices):  # one row per group, or the mean of the group's tensors
                self._writer.add_scalar(f"adaltm_lambda/{task}/group_{g:02d}", float(lambdas[rows, t].mean()),
                                        self.log_step)
        self._writer.flush()

    def _tie_backbone_to_base(self) -> None:
        """Point the backbone's (frozen) parameters into the merge's flat base buffers: one copy of the base."""
        model = self.backbone.model
        for name, view in self.merge.base_views().items():
            model.get_parameter(name).data = view

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._tie_backbone_to_base()
        return self


def _drop_frozen_backbone(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook of a frozen backbone: its weights are the configured base, never checkpoint content."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _frozen_backbone_not_missing(module: nn.Module, incompatible) -> None:
    """load_state_dict hook: a frozen backbone's weights come from the config, so their absence is expected."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith("backbone.")]
