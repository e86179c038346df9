"""Self-consistency votes and rationale filters, on hand-made samples and on the released PaLM outputs."""
import pytest

from dsbs_ray.rationales import choose, teacher_scores, vote
from dsbs_ray.tasks import Parsed, get_task, load_examples, load_teacher_outputs

SVAMP, CQA = get_task("svamp"), get_task("cqa")  # an equation task (votes by value), a choice task (by text)


def ok(label, rationale=None):
    return Parsed(rationale or f"because {label}", label, "ok")


BAD = Parsed("rambling", "", "no_answer")


def test_svamp_votes_by_equation_value_and_keeps_a_rationale_that_reaches_it():
    samples = [ok("(2 + 3)", "r0"), ok("(10 - 1)", "r1"), ok("(3 + 2)", "r2"), BAD, ok("(9)", "r4")]
    v = vote(samples, SVAMP)
    # (2 + 3) and (3 + 2) are one vote of 2; (10 - 1) and (9) another of 2: the tie goes to the label seen first
    assert (v.label, v.votes, v.first) == ("(2 + 3)", 2, 0)
    assert vote(samples[1:], SVAMP).label == "(10 - 1)"  # now the value 9 is seen first
    c = choose(samples, gold="(4 + 5)", task=SVAMP, rationale_filter="agree-gold")
    assert c.teacher_label == "(2 + 3)" and c.rationale == "r1"  # the first rationale that reaches gold's value


def test_exact_match_votes_by_text_and_a_strict_majority_wins_over_order():
    samples = [ok("wooded area"), ok("city"), ok("city"), BAD, ok("city")]
    assert vote(samples, CQA).label == "city" and vote(samples, CQA).votes == 3
    c = choose(samples, "city", CQA, "none")
    assert c.rationale == "because city"  # the kept rationale reaches the vote, not sample 0's


@pytest.mark.parametrize("rationale_filter, unmatched, keep, rationale", [
    ("none", "no-rationale", True, "rambling"),  # the paper: sample 0's rationale however bad
    ("agree-vote", "no-rationale", True, ""),  # no sample parses: no vote, no rationale
    ("agree-vote", "drop", False, ""),
    ("agree-gold", "no-rationale", True, ""),
    ("agree-gold", "drop", False, ""),
])
def test_a_row_where_nothing_parses(rationale_filter, unmatched, keep, rationale):
    c = choose([BAD, BAD], "x", CQA, rationale_filter, unmatched)
    assert (c.keep, c.rationale, c.teacher_ok) == (keep, rationale, False)


def test_agree_gold_without_a_matching_sample_leaves_the_row_without_rationale_or_drops_it():
    samples = [ok("a", "ra"), ok("b", "rb")]
    kept = choose(samples, "c", CQA, "agree-gold", "no-rationale")
    assert kept.keep and kept.rationale == "" and kept.teacher_label == "a"
    assert not choose(samples, "c", CQA, "agree-gold", "drop").keep
    assert choose(samples, "b", CQA, "agree-gold").rationale == "rb"
    assert choose(samples, "c", CQA, "agree-vote").rationale == "ra"


def test_teacher_scores_first_sample_vote_and_agreement():
    rows = [[ok("a"), ok("b"), ok("b")],  # first wrong, vote right (gold b)
            [ok("c"), ok("c"), ok("c")],  # unanimous, right
            [BAD, ok("d"), ok("e")]]  # first unparsed; vote d (tie -> first seen), gold e: wrong
    s = teacher_scores(rows, ["b", "c", "e"], CQA)
    assert s["first_sample_accuracy"] == pytest.approx(1 / 3) and s["vote_accuracy"] == pytest.approx(2 / 3)
    assert s["agreement"] == pytest.approx((2 / 3 + 1 + 1 / 3) / 3) and s["unanimous"] == pytest.approx(1 / 3)
    assert s["parse_failures"] == 1


@pytest.mark.parametrize("task, n, right", [("cqa", 9741, 7234), ("svamp", 800, 586)])
def test_filters_on_the_released_palm_train_outputs(data_dir, task, n, right):
    """agree-gold keeps exactly the rows the teacher-report counts right; none keeps every row."""
    examples = load_examples(task, "train", data_dir)
    outputs = load_teacher_outputs(task, "train", data_dir)
    parse = get_task(task).parse
    chosen = {f: [choose([parse(o)], e.gold, get_task(task), f, "drop") for e, o in zip(examples, outputs)]
              for f in ("none", "agree-vote", "agree-gold")}
    assert len(examples) == n
    assert sum(c.keep for c in chosen["none"]) == n
    assert sum(c.keep for c in chosen["agree-gold"]) == right  # the teacher-report's accuracy x n
    parsed = sum(parse(o).ok for o in outputs)
    assert sum(c.keep for c in chosen["agree-vote"]) == parsed


FAILED = Parsed("", "", "failed")  # a sample the engine refused (its prompt did not fit, say)


@pytest.mark.parametrize("unmatched, keep", [("no-rationale", True), ("drop", False)])
def test_a_refused_sample_is_never_the_kept_rationale_and_a_row_of_refused_samples_has_none(unmatched, keep):
    c = choose([FAILED, BAD], "x", CQA, "none", unmatched)
    assert (c.keep, c.rationale, c.teacher_ok) == (True, "rambling", False)  # the first sample that answered
    c = choose([FAILED, FAILED], "x", CQA, "none", unmatched)
    assert (c.keep, c.rationale, c.teacher_ok) == (keep, "", False)
