"""The configured vector operations, fitted to the vectors: the one place τ becomes τ', for training and export.

`VectorPipeline.fit` runs each operation's whole-model pass (if it has one) over the vectors as the operations
before it left them, in the flat layout's order; `values(name)` then gives τ' of one name for every task. The
upstream fills its flat buffers with it and `adaltm export` its groups, so both merge the same τ'.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from adaltm_upstream.methods.base import Values, VectorOp


class VectorPipeline:
    """Also a `VectorStream`: iterating it yields (name, τ' of every task) in layout order, read from the files."""

    def __init__(self, vectors: Sequence[Mapping[str, torch.Tensor]], tasks: Sequence[str], names: Sequence[str],
                 ops: Sequence[VectorOp] = (), fitted: Sequence[Any] = ()):
        if len(vectors) != len(tasks):
            raise ValueError(f"{len(vectors)} vectors for {len(tasks)} task names")
        self.vectors, self.tasks, self.names = list(vectors), list(tasks), list(names)
        self.ops, self.fitted = list(ops), list(fitted)

    @classmethod
    def fit(cls, ops: Sequence[VectorOp], vectors: Sequence[Mapping[str, torch.Tensor]], tasks: Sequence[str],
            names: Sequence[str]) -> VectorPipeline:
        """The operations in order, each fitted on what the ones before it produce (no pass without a
        whole-model operation)."""
        pipeline = cls(vectors, tasks, names)
        for op in ops:
            state = op.fit(pipeline) if op.whole_model else None
            pipeline = cls(vectors, tasks, names, [*pipeline.ops, op], [*pipeline.fitted, state])
        return pipeline

    @property
    def identity(self) -> bool:
        return not self.ops

    def values(self, name: str) -> Values:
        """τ' of `name` for every task (None where a task's vector lacks it)."""
        values: Values = [vector[name] if name in vector else None for vector in self.vectors]
        for op, state in zip(self.ops, self.fitted):
            values = op.apply(name, values, self.tasks, state)
        return values

    def __iter__(self) -> Iterator[tuple[str, Values]]:
        for name in self.names:
            yield name, self.values(name)

