"""λ tables by kind (`merge.granularity`): which rows λ has, which of them train, which rows a layer group uses.

Every table is (rows × tasks) of raw λ:
- `static`: one row per layer group, fixed (task arithmetic at merge.init);
- `global`: one trained row shared by every group (stored once, expanded to one row per group);
- `layerwise`: one trained row per group (the paper's AdaLTM);
- `tensorwise`: one trained row per tensor, in the flat layout's order (AdaMerging's original granularity).
A group's λ is a 1-D tensor (one λ per task for the whole group, merged by one `addmv`) or, for tensorwise, a
(tensors × tasks) block (one `addmv` per tensor) — `merging.merge_group` takes either. `frozen_groups` keep their
initial rows (layerwise and tensorwise; `speed.freeze_group0`). This is the one module that knows the
granularity names: everything else asks the table.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

import torch


class LambdaTable:
    kind: ClassVar[str]
    trains: ClassVar[bool] = True
    per_tensor: ClassVar[bool] = False   # rows are tensors (named by tensor), not layer groups
    freezes: ClassVar[bool] = True       # honours frozen_groups

    def __init__(self, groups: list[list[str]], frozen_groups: frozenset[int] = frozenset()):
        self.num_groups = len(groups)
        self.row_names = self._row_names(groups)
        self.row_slices = self._row_slices(groups)
        self.row_group = [g for g, rows in enumerate(self.row_slices) for _ in range(rows.start, rows.stop)]
        self.frozen_groups = frozenset(frozen_groups) if self.freezes else frozenset()
        self.trained_rows = [r for r, g in enumerate(self.row_group) if g not in self.frozen_groups]

    def _row_names(self, groups: list[list[str]]) -> list[str]:
        return [f"group_{g}" for g in range(len(groups))]

    def _row_slices(self, groups: list[list[str]]) -> list[slice]:
        return [slice(g, g + 1) for g in range(len(groups))]

    def initial(self, init: list[float]) -> torch.Tensor:
        """The full raw table at `init` (one value per task)."""
        return torch.tensor(init, dtype=torch.float32).expand(len(self.row_names), len(init)).clone()

    def trained_part(self, full: torch.Tensor) -> torch.Tensor:
        """The rows of a full table that the optimizer trains."""
        return full[self.trained_rows]

    def expand(self, trained: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The full raw table from the trained rows and the fixed ones (frozen rows come from `fixed`)."""
        if not self.frozen_groups:
            return trained
        rows = list(fixed.unbind(0))
        for row, r in zip(trained.unbind(0), self.trained_rows):
            rows[r] = row
        return torch.stack(rows)

    def for_group(self, lambdas: torch.Tensor, g: int) -> torch.Tensor:
        """Group g's λ: one per task (1-D), shared by the whole group."""
        return lambdas[g]


class StaticTable(LambdaTable):
    kind, trains, freezes = "static", False, False


class GlobalTable(LambdaTable):
    kind, freezes = "global", False

    def trained_part(self, full: torch.Tensor) -> torch.Tensor:
        return full[:1]

    def expand(self, trained: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return trained.expand(self.num_groups, trained.shape[1])


class LayerwiseTable(LambdaTable):
    kind = "layerwise"


class TensorwiseTable(LambdaTable):
    kind, per_tensor = "tensorwise", True

    def _row_names(self, groups: list[list[str]]) -> list[str]:
        return [name for names in groups for name in names]

    def _row_slices(self, groups: list[list[str]]) -> list[slice]:
        ends = itertools.accumulate(len(names) for names in groups)
        return [slice(end - len(names), end) for names, end in zip(groups, ends)]

    def for_group(self, lambdas: torch.Tensor, g: int) -> torch.Tensor:
        """Group g's rows, one per tensor (2-D)."""
        return lambdas[self.row_slices[g]]


TABLES: dict[str, type[LambdaTable]] = {table.kind: table for table in (LayerwiseTable, GlobalTable, StaticTable,
                                                                       TensorwiseTable)}
Granularity = Literal[tuple(TABLES)]  # the config's choices, in this order


def table(granularity: str, groups: list[list[str]], frozen_groups: frozenset[int] = frozenset()) -> LambdaTable:
    return TABLES[granularity](groups, frozen_groups)
