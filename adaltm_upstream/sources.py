"""What a merge is made of, loaded and checked once for the upstream and for `adaltm export`: the base, the task
vectors, the layer groups and the fingerprint that states checkpoints record.

Nothing heavy is read: base and vectors stay memory-mapped (`LazyState`), shapes are checked from the files'
indexes, and the fingerprints stream one tensor at a time. The checks run in one order: every vector holds the
base's tensors and shapes, then was extracted from this base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from adaltm_upstream import lambdas, task_vectors
from adaltm_upstream.checkpoints import Checkpoint, load_checkpoint
from adaltm_upstream.config import UpstreamConfig
from adaltm_upstream.groups import partition
from adaltm_upstream.methods.pipeline import VectorPipeline
from adaltm_upstream.methods.registry import record


@dataclass
class MergeSources:
    config: UpstreamConfig
    base: Checkpoint
    vectors: list[task_vectors.TaskVector]
    groups: list[list[str]]         # canonical names per layer group: the flat layout
    fingerprint: str

    @property
    def init(self) -> list[float]:
        """merge.init, one λ per task."""
        return [self.config.merge.init_for(t) for t in self.config.tasks]

    @property
    def vector_dtype(self) -> torch.dtype:
        return task_vectors.DTYPES[self.config.speed.vector_dtype]

    def table(self, frozen_groups: frozenset[int] = frozenset()) -> lambdas.LambdaTable:
        """The λ table of merge.granularity over these groups."""
        return lambdas.table(self.config.merge.granularity, self.groups, frozen_groups)

    def pipeline(self) -> VectorPipeline:
        """The task vectors through merge.vector_ops, fitted over the whole model in layout order (each
        whole-model pass streams from the files)."""
        names = [name for names in self.groups for name in names]
        return VectorPipeline.fit(self.config.merge.vector_ops, [v.tensors for v in self.vectors],
                                  self.config.tasks, names)


def load(config: UpstreamConfig, base: Checkpoint | None = None,
         vectors: list[task_vectors.TaskVector] | None = None) -> MergeSources:
    """`base` and `vectors` default to the files the config names (benchmarks pass them in memory)."""
    base = base if base is not None else load_checkpoint(config.base, check_values=False)
    if vectors is None:
        vectors = [task_vectors.load(path) for path in config.task_vectors.values()]
    for vector in vectors:
        task_vectors.check_shapes(vector, config.base, base.state)
    base_fingerprint = task_vectors.fingerprint(base.state)
    for vector in vectors:
        task_vectors.check_against_base(vector, base_fingerprint, config.base)
    fingerprint = upstream_fingerprint(base_fingerprint, [task_vectors.fingerprint(v.tensors) for v in vectors],
                                       config)
    groups = partition(base.state, base.num_layers, base.config.do_stable_layer_norm,
                       config.merge.encoder_norm_group)
    return MergeSources(config, base, vectors, groups, fingerprint)


def upstream_fingerprint(base_fingerprint: str, vector_fingerprints: list[str], config: UpstreamConfig) -> str:
    """What states checkpoints record: base, every (task, vector) pair in order, and the task-vector operations
    and λ constraints when used (runs without them keep their fingerprints)."""
    parts = [base_fingerprint] + [f"{t}={f}" for t, f in zip(config.tasks, vector_fingerprints)]
    if config.merge.vector_ops:
        parts.append("ops=" + json.dumps(record(config.merge.vector_ops), sort_keys=True))
    if config.merge.constraints:
        parts.append("constraints=" + json.dumps(record(config.merge.constraints), sort_keys=True))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
