"""The s3prl upstream `adaltm_wavlm`: a frozen WavLM base, frozen task vectors, learnable λ per layer group.

Data in: a list of 16 kHz waveforms (s3prl's upstream contract). Transformed: `GroupedMerge` builds the merged
weights from λ, `WavLMBackbone` runs them. Out: `hidden_states` for s3prl's weighted-sum featurizer.

What s3prl sees of it:
- trainable parameters: λ only (`merge.coefficients`); everything frozen is a non-persistent buffer or a frozen
  parameter that DDP is told to ignore (never broadcast);
- `state_dict()`: λ (`merge.coefficients`) and, as extra state, their full (groups × tasks) matrix, the task
  names, the granularity and a fingerprint of base + vectors — never the frozen tensors; loading states whose
  fingerprint, tasks or granularity differ from the config's is refused;
- `train()`: the backbone stays in eval mode (frozen-backbone semantics: no dropout while λ trains), unless
  `merge.train_merged_weights` turns the merged weights into ordinary trainable parameters (MTL baseline
  "static init"); its checkpoints then also carry every backbone weight as `backbone.model.<canonical name>` plus
  the architecture (a full model, ~1.3 GB for WavLM-Large, which `adaltm task-vector extract --finetuned` reads).
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from torch import nn
from torch.distributed import get_rank, is_initialized
from torch.nn.parallel import DistributedDataParallel

from adaltm_core.errors import UserError
from adaltm_upstream import task_vectors, vector_ops
from adaltm_upstream.backbone import WavLMBackbone
from adaltm_upstream.checkpoints import Checkpoint, load_checkpoint
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.groups import partition
from adaltm_upstream.merging import NO_CONSTRAINTS, NO_OPS, GroupedMerge
from adaltm_upstream.vector_ops import LambdaConstraints

STATES_FORMAT = "adaltm-states/2"
LOG_EVERY = 20  # training forwards between two λ points in tensorboard


class StatesMismatch(UserError):
    """Checkpointed λ do not belong to the configured base and task vectors."""


class AdaLTMUpstream(nn.Module):
    def __init__(self, config: UpstreamConfig, base: Checkpoint | None = None,
                 vectors: list[task_vectors.TaskVector] | None = None):
        """`base` and `vectors` default to the files the config names (benchmarks pass them in memory)."""
        super().__init__()
        self.config = config
        base = base if base is not None else load_checkpoint(config.base, check_values=False)
        if vectors is None:
            vectors = [task_vectors.load(path) for path in config.task_vectors.values()]
        self.tasks = config.tasks
        for vector in vectors:
            task_vectors.check_shapes(vector, config.base, base.state)
        # Base and vectors stream from their files straight into the merge's flat buffers; the backbone's
        # parameters are views of the base buffers. Peak: the buffers plus one tensor in flight.
        groups = partition(base.state, base.num_layers, base.config.do_stable_layer_norm,
                           config.merge.encoder_norm_group)
        self.merge = GroupedMerge(
            base.state, [v.tensors for v in vectors], groups,
            init=[config.merge.init_for(t) for t in self.tasks], granularity=config.merge.granularity,
            frozen_groups=frozenset({0}) if config.speed.freeze_group0 else frozenset(),
            vector_dtype=task_vectors.DTYPES[config.speed.vector_dtype],
            tasks=self.tasks, ops=config.merge.vector_ops, constraints=config.merge.constraints,
        )
        base_fingerprint = task_vectors.fingerprint(self.merge.base_views())
        for vector in vectors:
            task_vectors.check_against_base(vector, base_fingerprint, config.base)
        self.fingerprint = upstream_fingerprint(base_fingerprint, [task_vectors.fingerprint(v.tensors)
                                                                   for v in vectors], config)
        self.backbone = WavLMBackbone(base.config, base.normalize, config.hidden_states,
                                      attention=config.speed.attention, weights=self.merge.base_views())
        self.backbone.requires_grad_(False)
        # children in the order they had before the merge was built first: optimizer states of resumed runs
        # address parameters by position
        self._modules["merge"] = self._modules.pop("merge")
        self.trains_weights = config.merge.train_merged_weights
        if self.trains_weights:
            self._become_trainable_weights()
        else:
            self.backbone.register_state_dict_post_hook(_drop_frozen_backbone)
            self.register_load_state_dict_post_hook(_frozen_backbone_not_missing)
            frozen = [n for n, _ in self.named_parameters() if n != "merge.coefficients"]
            frozen += [n for n, _ in self.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)
        if config.speed.compile:
            self.backbone.compile_encoder()
        self.log_step = 0
        self._writer = None
        self._expdir: str | None = None

    # -- s3prl's upstream interface -------------------------------------------------------------------------
    def get_downsample_rates(self, key: str) -> int:
        return math.prod(self.backbone.config.conv_stride)

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        params = None
        if self.merge.num_tasks and not self.trains_weights:
            # λ and the merge's accumulation stay fp32 under any autocast (addmv would otherwise run in bf16/fp16)
            with torch.autocast(self.merge.fixed.device.type, enabled=False):
                params = self.merge()
        states = self.backbone(wavs, params=params).hidden_states
        if self.training and torch.is_grad_enabled():
            self.log_step += 1
            if self.log_step == 1 or self.log_step % LOG_EVERY == 0:
                self._log_lambdas()
        result = {"hidden_states": states, "last_hidden_state": states[-1]}
        result.update({f"hidden_state_{i}": s for i, s in enumerate(states)})
        return result

    def train(self, mode: bool = True) -> AdaLTMUpstream:
        super().train(mode)
        if not self.trains_weights:
            self.backbone.eval()
        return self

    # -- checkpoints: λ and a fingerprint, never the frozen tensors ------------------------------------------
    def get_extra_state(self) -> dict:
        state = {"format": STATES_FORMAT, "fingerprint": self.fingerprint, "tasks": list(self.tasks),
                 "granularity": self.config.merge.granularity, "log_step": self.log_step,
                 "vector_ops": self.config.merge.vector_ops.record(),
                 "constraints": self.config.merge.constraints.record()}
        if self.trains_weights:
            state.update(architecture=self.backbone.config.to_dict(), normalize=self.backbone.normalize)
        return state

    def set_extra_state(self, state: dict) -> None:
        """Runs before the children's states load, so a mismatch is refused before any λ changes."""
        check_states(state, self.fingerprint, self.config)
        self.log_step = int(state.get("log_step", 0))

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def lambdas(self) -> torch.Tensor:
        """λ as merged (after merge.constraints), (rows × tasks): rows are groups, or tensors for tensorwise."""
        return self.merge.effective_lambdas().detach()

    def merged_state(self) -> dict[str, torch.Tensor]:
        """Canonical merged weights at the current λ (what `adaltm export` writes)."""
        with torch.no_grad():
            merged = self.merge() if self.merge.num_tasks and not self.trains_weights else {}
            return {name: merged.get(name, p).detach().clone()
                    for name, p in self.backbone.model.state_dict().items()}

    def attach_experiment(self, expdir: str) -> None:
        """Called by the launcher's runner hook so λ can be logged next to the runner's own tensorboard."""
        self._expdir = expdir

    def _log_lambdas(self) -> None:
        if self._expdir is None or self.merge.num_tasks == 0 or (is_initialized() and get_rank() != 0):
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self._expdir, filename_suffix=".adaltm")
        lambdas = self.lambdas().cpu()
        rows = torch.tensor(self.merge.row_group)
        for t, task in enumerate(self.tasks):
            for g in range(self.merge.num_groups):  # tensorwise: the mean over the group's tensors
                value = lambdas[rows == g, t].mean() if self.merge.granularity == "tensorwise" else lambdas[g, t]
                self._writer.add_scalar(f"adaltm_lambda/{task}/group_{g:02d}", float(value), self.log_step)
        self._writer.flush()

    def _become_trainable_weights(self) -> None:
        """MTL "static init": start from W_base + Σ λ τ and train every weight; the flat buffers are released."""
        with torch.no_grad():
            merged = self.merge() if self.merge.num_tasks else self.merge.base_views()
            for name, param in self.backbone.model.named_parameters():
                param.data = merged[name].clone() if name in merged else param.data.clone()
        self.merge.release()
        self.merge.requires_grad_(False)
        self.backbone.requires_grad_(True)

    def _tie_backbone_to_base(self) -> None:
        """Point the backbone's (frozen) parameters into the merge's flat base buffers: one copy of the base."""
        model = self.backbone.model
        for name, view in self.merge.base_views().items():
            model.get_parameter(name).data = view

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if not self.trains_weights:
            self._tie_backbone_to_base()
        return self


def upstream_fingerprint(base_fingerprint: str, vector_fingerprints: list[str], config: UpstreamConfig) -> str:
    """What states checkpoints record: base, every (task, vector) pair in order, and the task-vector operations
    and λ constraints when used (runs without them keep their fingerprints)."""
    parts = [base_fingerprint] + [f"{t}={f}" for t, f in zip(config.tasks, vector_fingerprints)]
    if not config.merge.vector_ops.identity:
        parts.append("ops=" + json.dumps(config.merge.vector_ops.record(), sort_keys=True))
    if config.merge.constraints != NO_CONSTRAINTS:
        parts.append("constraints=" + json.dumps(config.merge.constraints.record(), sort_keys=True))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def check_states(state: dict, fingerprint: str, config: UpstreamConfig) -> None:
    """Refuse an upstream extra state whose base, task vectors, granularity or merging method are not the
    config's; a difference in method alone is named as such."""
    found = (state.get("fingerprint"), list(state.get("tasks", [])), state.get("granularity"))
    expected = (fingerprint, config.tasks, config.merge.granularity)
    merge = config.merge
    methods = (state.get("vector_ops", NO_OPS.record()), state.get("constraints", NO_CONSTRAINTS.record()))
    if found[1:] == expected[1:] and methods != (merge.vector_ops.record(), merge.constraints.record()):
        raise StatesMismatch(
            f"{config.source}: the checkpoint's λ were trained with other task-vector operations or λ "
            f"constraints (merge.vector_ops {methods[0]}, merge.constraints {methods[1]}; this config gives "
            f"{merge.vector_ops.record()}, {merge.constraints.record()})")
    if found != expected:
        raise StatesMismatch(
            f"{config.source}: the checkpoint's λ were trained on another base, other task vectors or "
            f"another granularity (fingerprint {found[0]}, tasks {found[1]}, {found[2]}; this config gives "
            f"{expected[0]}, tasks {expected[1]}, {expected[2]})")


def _drop_frozen_backbone(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook of a frozen backbone: its weights are the configured base, never checkpoint content."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _frozen_backbone_not_missing(module: nn.Module, incompatible) -> None:
    """load_state_dict hook: a frozen backbone's weights come from the config, so their absence is expected."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith("backbone.")]


def read_lambdas(upstream_state: dict) -> tuple[list[str], torch.Tensor] | None:
    """(tasks, λ as merged, rows × tasks) from the `Upstream` entry of an `adaltm_wavlm` states checkpoint, or None.
    Rows are layer groups, or tensors for tensorwise (`lambda_rows` names them)."""
    top, merge = upstream_state.get("_extra_state"), upstream_state.get("merge._extra_state")
    if not isinstance(top, dict) or top.get("format") != STATES_FORMAT or not isinstance(merge, dict):
        return None
    constraints = LambdaConstraints(**merge.get("constraints", {}))
    return list(top["tasks"]), vector_ops.constrain(merge["lambdas"], constraints)


def lambda_rows(upstream_state: dict) -> list[str]:
    """Names of the λ rows in `read_lambdas`: `group_<g>`, or canonical tensor names for tensorwise."""
    merge = upstream_state.get("merge._extra_state") or {}
    return list(merge.get("row_names") or [f"group_{g}" for g in range(len(merge.get("lambdas", [])))])
