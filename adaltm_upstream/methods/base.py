"""What a merging method is: a named, typed transform of the task vectors or of λ, recorded where it was used.

Two kinds, each kept in `registry` by name:
- `VectorOp` rewrites the task vectors τ_t into τ'_t once, before the linear merge W = W_base + Σ_t λ_t τ'_t. Its
  typed parameters are dataclass fields (parsed, ranged and reported like every config field); `apply` works on
  one tensor name at a time (every task's tensor of that name); a method that needs statistics of the whole model
  sets `whole_model = True` and computes them in `fit`, which may iterate the vectors (`VectorStream`) as often as
  it needs — each pass streams one name at a time from the files, so memory stays at the flat buffers plus one
  name's tensors. Training and `adaltm export` run the same `fit` over the same stream, so they merge the same τ'.
- `LambdaConstraint` maps the raw (trained) λ to the λ the merge uses (clamp, normalisation across tasks).

`record()` (name + parameters) is what checkpoints, exports and the upstream's fingerprint hold: resuming or
exporting with other parameters is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol

import torch

# One tensor per task for one canonical name; None where a task's vector lacks the name (it merges as zero).
Values = list[torch.Tensor | None]


class VectorStream(Protocol):
    """The task vectors, one canonical name at a time in the flat layout's order, as the operations before the
    one being fitted left them. Iterable any number of times; each pass reads the files again."""

    tasks: Sequence[str]
    names: Sequence[str]

    def __iter__(self) -> Iterator[tuple[str, Values]]: ...


@dataclasses.dataclass(frozen=True)
class Method:
    """Name and parameters; subclasses are frozen dataclasses whose fields are the parameters."""

    name: ClassVar[str]

    def record(self) -> dict[str, Any]:
        """Plain values: `{"name": ..., <parameter>: <value>, ...}`."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclasses.dataclass(frozen=True)
class VectorOp(Method):
    # True: `fit` reads the whole model before the first `apply` (training and export both call it)
    whole_model: ClassVar[bool] = False

    def label(self) -> str:
        """How tables name the operation, e.g. `DARE p=0.5`."""
        raise NotImplementedError

    def check_tasks(self, tasks: Sequence[str], where: str) -> None:
        """Refuse parameters that name tasks the config lacks (raise `SettingsError` naming `where`'s field)."""

    def fit(self, vectors: VectorStream) -> Any:
        """Statistics of the whole model that `apply` needs (small: scalars, thresholds); only called when
        `whole_model` is set."""
        return None

    def apply(self, name: str, values: Values, tasks: Sequence[str], fitted: Any) -> Values:
        """τ' of one canonical name for every task: new tensors in each input's dtype, None where the input is
        None; the inputs are never modified."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LambdaConstraint(Method):
    def constrain(self, lambdas: torch.Tensor) -> torch.Tensor:
        """λ (... × tasks) as the merge uses them; differentiable."""
        raise NotImplementedError
