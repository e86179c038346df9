"""Which rationale and which teacher label a row trains on, from the teacher's k samples for it:
self-consistency voting and rationale filtering. Plain Python, no Ray.

Voting: the teacher's label for a row is the most frequent of its parsed labels, compared the way
the task is scored (SVAMP equations by value, so (3 + 4) and (4 + 3) are one vote). A tie goes to the
label whose first sample came first, so the vote of k = 1 is sample 0's label.

Filters (`rationale_filter`, a sweep axis):
  none        every row keeps a rationale: the first one that reaches the vote (sample 0's when no
              sample parses). With k = 1 this is the paper's one greedy rationale per row.
  agree-vote  only a rationale whose label is the vote; a row with no parsed label has none.
  agree-gold  only a rationale whose label matches gold (the first such sample); a row where no
              sample does has none.
A row left without a rationale either trains on its label alone (`unmatched: no-rationale`) or is
dropped (`unmatched: drop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from dsbs_ray.tasks import Parsed, Task

FILTERS = ("none", "agree-vote", "agree-gold")
RationaleFilter = Literal["none", "agree-vote", "agree-gold"]
Unmatched = Literal["no-rationale", "drop"]


@dataclass(frozen=True)
class Vote:
    label: str  # "" when no sample parsed
    votes: int  # samples that agree with the vote
    samples: int  # k
    first: int | None  # the first sample that reaches the vote

    @property
    def unanimous(self) -> bool:
        return self.samples > 0 and self.votes == self.samples


def vote(samples: Sequence[Parsed], task: Task) -> Vote:
    """Majority of the parsed labels; ties to the label seen first."""
    counts: dict = {}
    first: dict = {}
    for i, s in enumerate(samples):
        if not s.ok:
            continue
        key = task.vote_key(s.label)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return Vote("", 0, len(samples), None)
    best = min(counts, key=lambda k: (-counts[k], first[k]))
    return Vote(samples[first[best]].label, counts[best], len(samples), first[best])


@dataclass(frozen=True)
class Choice:
    """What a row trains on: the teacher label (the vote) and the kept rationale ("" for none)."""

    teacher_label: str
    teacher_ok: bool  # the vote exists (some sample parsed)
    rationale: str
    keep: bool  # False: the row is dropped (unmatched: drop)


def choose(samples: Sequence[Parsed], gold: str, task: Task, rationale_filter: str = "none",
           unmatched: str = "no-rationale") -> Choice:
    v = vote(samples, task)
    if rationale_filter == "none":  # (a sample the engine refused has no rationale to keep)
        pick = v.first if v.first is not None else next((i for i, s in enumerate(samples) if s.status != "failed"), None)
    elif rationale_filter == "agree-vote":
        pick = v.first
    elif rationale_filter == "agree-gold":
        pick = next((i for i, s in enumerate(samples) if s.ok and task.match(s.label, gold)), None)
    else:
        raise ValueError(f"unknown rationale filter {rationale_filter!r}")
    rationale = samples[pick].rationale if pick is not None else ""
    keep = pick is not None or unmatched == "no-rationale"
    return Choice(v.label, v.first is not None, rationale, keep)


def teacher_scores(rows: Sequence[Sequence[Parsed]], golds: Sequence[str], task: Task) -> dict:
    """The teacher's accuracy on a split from its samples: of sample 0 (the paper's greedy answer),
    of the vote, and how far the samples agree (mean share of a row's samples that reach its vote;
    share of rows where all samples agree)."""
    match = task.match
    n = len(rows)
    if not n:
        return {"rows": 0, "first_sample_accuracy": 0.0, "vote_accuracy": 0.0, "agreement": 0.0, "unanimous": 0.0,
                "parse_failures": 0}
    votes = [vote(r, task) for r in rows]
    first_right = sum(bool(r) and r[0].ok and match(r[0].label, g) for r, g in zip(rows, golds))
    vote_right = sum(v.first is not None and match(v.label, g) for v, g in zip(votes, golds))
    return {"rows": n, "first_sample_accuracy": first_right / n, "vote_accuracy": vote_right / n,
            "agreement": sum(v.votes / max(v.samples, 1) for v in votes) / n,
            "unanimous": sum(v.unanimous for v in votes) / n,
            "parse_failures": sum(not (r and r[0].ok) for r in rows)}
