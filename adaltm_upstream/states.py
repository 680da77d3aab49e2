"""What an `adaltm_wavlm` states checkpoint holds about its merge, and the refusal of states that do not belong to
a config: read by the upstream on `-e` resume and by `adaltm export --states`.

The upstream's extra state (`STATES_FORMAT`) names the fingerprint of base + vectors + methods, the tasks, the
granularity and the method records; the merge's extra state holds the raw λ table and the constraints. λ as
merged are computed from those two with the registered constraints (`read_lambdas`, for figures).
"""

from __future__ import annotations

import torch

from adaltm_core.errors import UserError
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.methods.constraints import constrain
from adaltm_upstream.methods.registry import constraints_from_record, parse_vector_ops, record

STATES_FORMAT = "adaltm-states/2"


class StatesMismatch(UserError):
    """Checkpointed λ do not belong to the configured base and task vectors."""


def extra_state(config: UpstreamConfig, fingerprint: str) -> dict:
    """The upstream's part of a states checkpoint, common to every `adaltm_wavlm`."""
    return {"format": STATES_FORMAT, "fingerprint": fingerprint, "tasks": list(config.tasks),
            "granularity": config.merge.granularity, "vector_ops": record(config.merge.vector_ops),
            "constraints": record(config.merge.constraints)}


def _methods(state: dict) -> tuple[list, list]:
    """The state's method records in today's list form (states from before the registry recorded mappings)."""
    ops, constraints = state.get("vector_ops", []), state.get("constraints", [])
    return (record(parse_vector_ops(ops, "checkpoint vector_ops")),
            record(constraints_from_record(constraints)))


def check_states(state: dict, fingerprint: str, config: UpstreamConfig) -> None:
    """Refuse an upstream extra state whose base, task vectors, granularity or merging method are not the
    config's; a difference in method alone is named as such."""
    found = (state.get("fingerprint"), list(state.get("tasks", [])), state.get("granularity"))
    expected = (fingerprint, config.tasks, config.merge.granularity)
    merge = config.merge
    methods, configured = _methods(state), (record(merge.vector_ops), record(merge.constraints))
    if found[1:] == expected[1:] and methods != configured:
        raise StatesMismatch(
            f"{config.source}: the checkpoint's λ were trained with other task-vector operations or λ "
            f"constraints (merge.vector_ops {methods[0]}, merge.constraints {methods[1]}; this config gives "
            f"{configured[0]}, {configured[1]})")
    legacy = isinstance(state.get("vector_ops"), dict) or isinstance(state.get("constraints"), dict)
    if found[1:] == expected[1:] and legacy and (methods[0] or methods[1]):
        raise StatesMismatch(
            f"{config.source}: the checkpoint was written by an earlier adaltm that recorded its merging methods as a "
            "mapping; its fingerprint cannot be checked against this version's: retrain, or use that version")
    if found != expected:
        raise StatesMismatch(
            f"{config.source}: the checkpoint's λ were trained on another base, other task vectors or "
            f"another granularity (fingerprint {found[0]}, tasks {found[1]}, {found[2]}; this config gives "
            f"{expected[0]}, tasks {expected[1]}, {expected[2]})")


def read_lambdas(upstream_state: dict) -> tuple[list[str], torch.Tensor] | None:
    """(tasks, λ as merged, rows × tasks) from the `Upstream` entry of an `adaltm_wavlm` states checkpoint, or None.
    Rows are layer groups, or tensors for tensorwise (`lambda_rows` names them)."""
    top, merge = upstream_state.get("_extra_state"), upstream_state.get("merge._extra_state")
    if not isinstance(top, dict) or top.get("format") != STATES_FORMAT or not isinstance(merge, dict):
        return None
    return list(top["tasks"]), constrain(merge["lambdas"], constraints_from_record(merge.get("constraints")))


def lambda_rows(upstream_state: dict) -> list[str]:
    """Names of the λ rows in `read_lambdas`: `group_<g>`, or canonical tensor names for tensorwise."""
    merge = upstream_state.get("merge._extra_state") or {}
    return list(merge.get("row_names") or [f"group_{g}" for g in range(len(merge.get("lambdas", [])))])
