"""The s3prl upstream `adaltm_wavlm`: a frozen WavLM base, frozen task vectors, learnable λ per layer group.

Data in: a list of 16 kHz waveforms (s3prl's upstream contract). Transformed: `GroupedMerge` builds the merged
weights from λ, `WavLMBackbone` runs them. Out: `hidden_states` for s3prl's weighted-sum featurizer.

What s3prl sees of it:
- trainable parameters: λ only (`merge.coefficients`); everything frozen is a non-persistent buffer or a frozen
  parameter that DDP is told to ignore (never broadcast);
- `state_dict()`: λ, the task names, the granularity and a fingerprint of base + vectors — never the frozen
  tensors; `load_state_dict` refuses states whose fingerprint differs from the config's;
- `train()`: the backbone stays in eval mode (frozen-backbone semantics: no dropout while λ trains), unless
  `merge.train_merged_weights` turns the merged weights into ordinary trainable parameters (MTL baseline
  "static init"); its checkpoints then also carry every backbone weight as `weights.<canonical name>` (a full
  model, ~1.3 GB for WavLM-Large, which `adaltm task-vector extract --finetuned` reads).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.distributed import get_rank, is_initialized
from torch.nn.parallel import DistributedDataParallel

from adaltm_core.errors import UserError
from adaltm_upstream import task_vectors
from adaltm_upstream.backbone import WavLMBackbone
from adaltm_upstream.checkpoints import Checkpoint, load_checkpoint
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.groups import partition
from adaltm_upstream.merging import GroupedMerge

LOG_EVERY = 20  # training forwards between two λ points in tensorboard
VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StatesMismatch(UserError):
    """Checkpointed λ do not belong to the configured base and task vectors."""


class AdaLTMUpstream(nn.Module):
    def __init__(self, config: UpstreamConfig, base: Checkpoint | None = None,
                 vectors: list[task_vectors.TaskVector] | None = None):
        """`base` and `vectors` default to the files the config names (benchmarks pass them in memory)."""
        super().__init__()
        self.config = config
        base = base if base is not None else load_checkpoint(config.base)
        base_fingerprint = task_vectors.fingerprint(base.state)
        if vectors is None:
            vectors = [task_vectors.load(path) for path in config.task_vectors.values()]
        for vector in vectors:
            task_vectors.check_against_base(vector, base_fingerprint, config.base)
        self.tasks = config.tasks
        self.fingerprint = hashlib.sha256("|".join(
            [base_fingerprint] + [f"{t}={task_vectors.fingerprint(v.tensors)}" for t, v in zip(self.tasks, vectors)]
        ).encode()).hexdigest()[:32]

        self.backbone = WavLMBackbone.from_checkpoint(base, config.hidden_states, sdpa=config.speed.sdpa_attention)
        self.backbone.requires_grad_(False)
        groups = partition(base.state, base.num_layers, base.config.do_stable_layer_norm,
                           config.merge.encoder_norm_group)
        self.merge = GroupedMerge(
            base.state, [v.tensors for v in vectors], groups,
            init=[config.merge.init_for(t) for t in self.tasks], granularity=config.merge.granularity,
            frozen_groups=frozenset({0}) if config.speed.freeze_group0 else frozenset(),
            vector_dtype=VECTOR_DTYPES[config.speed.vector_dtype],
        )
        self.trains_weights = config.merge.train_merged_weights
        if self.trains_weights:
            self._become_trainable_weights()
        else:
            self._tie_backbone_to_base()
            frozen = [n for n, _ in self.named_parameters() if n != "merge.coefficients"]
            frozen += [n for n, _ in self.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)
        # speed.compile: the backbone through torch.compile (dynamic shapes: utterance lengths vary)
        self._run_backbone = (torch.compile(self.backbone.forward, dynamic=True) if config.speed.compile
                              else self.backbone.forward)
        self.log_step = 0
        self._writer = None
        self._expdir: str | None = None

    # -- s3prl's upstream interface -------------------------------------------------------------------------
    def get_downsample_rates(self, key: str) -> int:
        return math.prod(self.backbone.config.conv_stride)

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        params = self.merge() if self.merge.num_tasks and not self.trains_weights else None
        states = self._run_backbone(wavs, params=params).hidden_states
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
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        state = {} if destination is None else destination
        state[f"{prefix}lambdas"] = self.merge.lambdas().detach().cpu().clone()
        state[f"{prefix}tasks"] = list(self.tasks)
        state[f"{prefix}granularity"] = self.config.merge.granularity
        state[f"{prefix}fingerprint"] = self.fingerprint
        state[f"{prefix}log_step"] = self.log_step
        if self.trains_weights:
            for name, tensor in self.backbone.model.state_dict(keep_vars=keep_vars).items():
                state[f"{prefix}weights.{name}"] = tensor if keep_vars else tensor.detach()
        return state

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        if state.get("fingerprint") != self.fingerprint or list(state.get("tasks", [])) != self.tasks:
            raise StatesMismatch(
                f"{self.config.source}: the checkpoint's λ were trained on another base or other task vectors "
                f"(fingerprint {state.get('fingerprint')}, tasks {state.get('tasks')}; this config gives "
                f"{self.fingerprint}, tasks {self.tasks})")
        self.merge.set_lambdas(state["lambdas"])
        self.log_step = int(state.get("log_step", 0))
        if self.trains_weights:
            weights = {k[len("weights."):]: v for k, v in state.items() if k.startswith("weights.")}
            self.backbone.model.load_state_dict(weights)
        return nn.modules.module._IncompatibleKeys([], [])

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def lambdas(self) -> torch.Tensor:
        """λ as (groups × tasks)."""
        return self.merge.lambdas().detach()

    def merged_state(self) -> dict[str, torch.Tensor]:
        """Canonical merged weights at the current λ (what `adaltm export` writes)."""
        with torch.no_grad():
            merged = self.merge() if self.merge.num_tasks and not self.trains_weights else {}
            return {name: merged.get(name, p).detach().clone()
                    for name, p in self.backbone.model.state_dict(keep_vars=True).items()}

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
        for t, task in enumerate(self.tasks):
            for g in range(lambdas.shape[0]):
                self._writer.add_scalar(f"adaltm_lambda/{task}/group_{g:02d}", float(lambdas[g, t]), self.log_step)
        self._writer.flush()

    def _become_trainable_weights(self) -> None:
        """MTL "static init": start from W_base + Σ λ τ and train every weight; the flat buffers are released."""
        with torch.no_grad():
            merged = self.merge() if self.merge.num_tasks else {}
            for name, param in self.backbone.model.named_parameters():
                param.data = merged[name].clone() if name in merged else param.data.clone()
        for g in range(self.merge.num_groups):
            setattr(self.merge, f"base_{g}", torch.zeros(0))
            setattr(self.merge, f"tau_{g}", torch.zeros(0, 0))
        self.merge._cache = None
        self.merge.requires_grad_(False)
        self.backbone.requires_grad_(True)

    def _tie_backbone_to_base(self) -> None:
        """Point the backbone's (frozen) parameters into the merge's flat base buffers: one copy of the base."""
        model = self.backbone.model
        for g in range(self.merge.num_groups):
            for name, view in self.merge.unflatten(g, self.merge.base(g)).items():
                model.get_parameter(name).data = view

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if not self.trains_weights:
            self._tie_backbone_to_base()
        return self
