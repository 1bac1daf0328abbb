"""``hydra/sweeper=mqb_grid``: Hydra's basic (cartesian) sweeper that checks a large grid in seconds.

Before launching, Hydra's basic sweeper composes every job's config once to catch composition errors early (a
wrong choice, a bad key); the launcher (or each SLURM array task) composes it again to run it. For the paper's
grids times methods (hundreds of configs) that first pass alone takes minutes on a small CPU. This sweeper composes
only a *covering* subset: jobs chosen so that every override value of the grid (``model=unetr``,
``precision=w4a4`` ...) appears in at least one composed job, which for a cartesian grid is about the sum of the
axes' lengths instead of their product. Whatever fails only in one combination still fails when that job runs
(its error record names it). Everything else is Hydra's basic sweeper.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

log = logging.getLogger(__name__)


def covering_jobs(batch: Sequence[Sequence[str]]) -> list[int]:
    """Indices of jobs of ``batch`` that together contain every override string of the batch (greedy: a job is
    taken when it brings an override not seen yet, in the batch's order)."""
    seen: set[str] = set()
    chosen = []
    for i, overrides in enumerate(batch):
        if not seen.issuperset(overrides):
            chosen.append(i)
            seen.update(overrides)
    return chosen


class GridSweeper(BasicSweeper):
    """Hydra's :class:`BasicSweeper` whose pre-launch check composes :func:`covering_jobs` only."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        chosen = covering_jobs(batch)
        super().validate_batch_is_legal([batch[i] for i in chosen])
        log.info(f"mqb_grid: checked {len(chosen)} of {len(batch)} configs (every override value composed once)")
