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


def test_a_seed_keys_its_own_entry_and_no_seed_keeps_the_key_entries_always_had(tmp_path):
    from dsbs_ray.prompts import load_prompt
    from dsbs_ray.tasks import get_task
    from dsbs_ray.teacher import TeacherSpec, teacher_identity

    task, prompt = get_task("svamp"), load_prompt("svamp")
    unseeded = teacher_identity(TeacherSpec(temperature=0.7), task, "train", prompt)
    assert "seed" not in unseeded["sampling"]  # (stores written before seeds existed still match)
    keys = {annotations.entry_path(tmp_path, teacher_identity(TeacherSpec(temperature=0.7, seed=s), task, "train", prompt))
            for s in (None, 0, 1)}
    assert len(keys) == 3
    # the restart and retry budgets are how a run copes, not what it draws: they key nothing
    budget = TeacherSpec(temperature=0.7, engine_restarts=0, request_retries=1, request_timeout_s=5)
    assert teacher_identity(budget, task, "train", prompt) == unseeded


def test_a_refused_sample_is_stored_with_its_reason_and_parts_from_before_the_error_column_still_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [Example(str(i), f"question {i}", "(2)") for i in range(2)]
    entry = annotations.open_entry(tmp_path, {"task": "svamp", "split": "train", "teacher": "t"})
    old = pa.Table.from_pylist([{k: v for k, v in _record(rows[0], 0).items()}])  # no `error` column
    pq.write_table(old, entry / "parts" / "0-old.parquet")
    annotations.write_part(entry, [_record(rows[1], 0) | {"raw": "", "rationale": "", "label": "",
                                                          "parse_status": annotations.FAILED, "error": "too long"}])
    got = annotations.read_samples(entry, rows, 1, columns=("parse_status", "error"))
    assert got == [[{"parse_status": "ok", "error": None}], [{"parse_status": "failed", "error": "too long"}]]
    assert annotations.done_samples(entry, [annotations.row_key(e) for e in rows], 1).all()
