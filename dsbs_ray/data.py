"""Which rows a run trains on: the carved validation split, nested data fractions, teacher outputs
joined to their rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dsbs_ray.errors import UserError
from dsbs_ray.tasks import Example, Task

VALID_FRACTION = 0.1  # the paper carves 10 % of train as validation where a task has no valid split
VALID_SEED = 0


@dataclass(frozen=True)
class AnnotatedExample:
    """A row with its teacher annotation (rationale and teacher label, parsed from the raw output)."""

    id: str
    input: str
    gold: str
    rationale: str
    teacher_label: str
    parse_status: str


def carve_validation(n_rows: int, valid_fraction: float = VALID_FRACTION, seed: int = VALID_SEED):
    """(train_indices, valid_indices) split the way the paper splits its train set.

    Same arithmetic as `datasets.Dataset.train_test_split(test_size=valid_fraction, seed=seed)`
    (ceil for the held-out count, a default_rng permutation), so the rows match the paper's.
    """
    n_valid = math.ceil(valid_fraction * n_rows)
    order = np.random.default_rng(seed).permutation(n_rows)
    return order[n_valid:].tolist(), order[:n_valid].tolist()


def fraction_indices(n_rows: int, fraction: float, seed: int) -> list[int]:
    """A deterministic subsample of range(n_rows) with round(fraction * n_rows) rows (at least 1).

    Nested for one seed: every smaller fraction's rows are inside every larger one's, so curves
    across fractions compare like with like. Returned in ascending order.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if n_rows == 0:
        return []
    k = max(1, round(fraction * n_rows))
    order = np.random.default_rng(seed).permutation(n_rows)
    return sorted(order[:k].tolist())


def attach_teacher(examples: list[Example], outputs: list[str], task: Task, where: str) -> list[AnnotatedExample]:
    """Join raw teacher outputs to their rows (row order) and parse them; never drops a row."""
    if len(examples) != len(outputs):
        raise UserError(f"{where}: {len(outputs)} teacher outputs for {len(examples)} rows")
    annotated = []
    for example, output in zip(examples, outputs):
        parsed = task.parse(output)
        annotated.append(
            AnnotatedExample(example.id, example.input, example.gold, parsed.rationale, parsed.label, parsed.status)
        )
    return annotated
