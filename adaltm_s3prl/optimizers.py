"""Optimizers for s3prl's `optimizer.name` lookup (`get_<name>` in `s3prl.optimizers`, registered by the
launcher). s3prl puts every trainable module into one group with one learning rate; these give the upstream,
AdaLTM's λ and the heads their own."""

from __future__ import annotations

import re

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)(?:encoder\.)?layers\.(\d+)\.")


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def parameter_groups(models: list[nn.Module], lr: float, upstream_lr: float | None = None,
                     lambda_lr: float | None = None, layer_decay: float = 1.0,
                     weight_decay: float = 0.0) -> list[dict]:
    """One group per learning rate. The upstream is the module with `get_downsample_rates` (s3prl's upstream
    interface); within it AdaLTM's λ (`merge.coefficients`) get `lambda_lr`, and with `layer_decay` < 1 the
    transformer layer l of L gets `upstream_lr · decay^(L − l)` (everything below the first layer: `decay^L`)."""
    groups: dict[tuple[str, float], list[nn.Parameter]] = {}
    for model in models:
        inner = _unwrap(model)
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        if not hasattr(inner, "get_downsample_rates"):
            groups.setdefault(("head", lr), []).extend(p for _, p in named)
            continue
        depths = [int(m.group(1)) + 1 for n, _ in named if (m := _LAYER.search(n))]
        top = max(depths, default=0)
        for name, param in named:
            if name.endswith("merge.coefficients"):
                key = ("lambda", lambda_lr if lambda_lr is not None else lr)
            else:
                match = _LAYER.search(name)
                depth = int(match.group(1)) + 1 if match else 0
                base = upstream_lr if upstream_lr is not None else lr
                key = (f"upstream.{depth}" if layer_decay != 1.0 else "upstream", base * layer_decay ** (top - depth))
            groups.setdefault(key, []).append(param)
    return [{"name": name, "params": params, "lr": group_lr, "weight_decay": 0.0 if name == "lambda" else weight_decay}
            for (name, group_lr), params in groups.items()]


def get_DifferentialAdamW(model_params, lr: float = 1e-4, upstream_lr: float | None = None,  # noqa: N802
                          lambda_lr: float | None = None, layer_decay: float = 1.0, weight_decay: float = 0.01,
                          betas=(0.9, 0.999), total_steps: int | None = None) -> torch.optim.Optimizer:
    """`optimizer: {name: DifferentialAdamW, lr, upstream_lr, lambda_lr, layer_decay, weight_decay}`.
    λ are never weight-decayed (decay would pull every coefficient towards 0, i.e. towards the base)."""
    groups = parameter_groups(model_params, lr, upstream_lr, lambda_lr, layer_decay, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


S3PRL_OPTIMIZERS = {"DifferentialAdamW": get_DifferentialAdamW}
