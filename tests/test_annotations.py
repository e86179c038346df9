"""The annotation store without an engine: content-keyed rows, resume bookkeeping, reads."""
import pytest

from dsbs_ray import annotations
from dsbs_ray.errors import UserError
from dsbs_ray.tasks import Example


def _record(e, k, label="(1 + 1)"):
    return {"row_key": annotations.row_key(e), "row_id": e.id, "sample": k, "raw": f"r. The answer is {label}.",
            "rationale": f"rationale {e.id}/{k}", "label": label, "parse_status": "ok", "output_tokens": 7}


def test_rows_are_keyed_by_content_and_a_request_reads_only_its_rows_and_samples(tmp_path):
    rows = [Example(str(i), f"question {i}", "(2)") for i in range(5)] + [Example("0", "question 0", "(2)")]
    entry = annotations.open_entry(tmp_path, {"task": "svamp", "split": "train", "teacher": "t"})
    assert annotations.open_entry(tmp_path, {"task": "svamp", "split": "train", "teacher": "t"}) == entry
    assert annotations.open_entry(tmp_path, {"task": "svamp", "split": "train", "teacher": "u"}) != entry
    annotations.write_part(entry, [_record(e, k) for e in rows[:3] for k in range(2)])
    done = annotations.done_samples(entry, [annotations.row_key(e) for e in rows], 3)
    # rows 0-2 have samples 0 and 1; the last row repeats row 0 (same id and input) and shares its samples
    assert done.tolist() == [[True, True, False]] * 3 + [[False] * 3] * 2 + [[True, True, False]]
    got = annotations.read_samples(entry, rows[:3] + rows[-1:], 2)
    assert [[s.rationale for s in r] for r in got] == [[f"rationale {i}/{k}" for k in range(2)] for i in (0, 1, 2, 0)]
    with pytest.raises(UserError, match="2 of 3 rows lack some of their 2 samples"):
        annotations.read_samples(entry, rows[2:5], 2)
    # a second writer of a sample already there: the first written wins
    annotations.write_part(entry, [_record(rows[0], 0, label="(9)")])
    assert annotations.read_samples(entry, rows[:1], 1)[0][0].label == "(1 + 1)"
    assert annotations.finished_report(entry, rows[:3], 2) is None
    annotations.mark_finished(entry, rows[:3], 2, {"rows": 3})
    assert annotations.finished_report(entry, rows[:3], 2) == {"rows": 3}
    assert annotations.finished_report(entry, rows[:3], 3) is None and annotations.finished_report(entry, rows[:2], 2) is None
    assert not list((entry / "parts").glob(".*"))  # no temp file left behind
