"""A damaged cache is a cache miss: each kind the project keeps (token caches, the converted SmolLM2
model and tokenizer, annotation done markers, the teacher's layout manifest) truncated or overwritten,
then read again: one warning line naming it, the entry rebuilt, the same result as before. A damaged
store part (paid-for samples) is one line naming the file and what to do."""

import json
import shutil

import pytest
import torch

from dsbs_ray import annotations
from dsbs_ray.errors import UserError
from dsbs_ray.tasks import Example


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_damaged_token_cache_is_rebuilt_with_one_warning(capsys):
    from transformers import AutoTokenizer

    from dsbs_ray.cache import cache_dir
    from dsbs_ray.data import tokenize_split
    from dsbs_ray.embedded import smollm2_tokenizer_path
    from dsbs_ray.families import causal

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_path())
    rows = [{"id": str(i), "input": f"question {i}?", "label": f"{i}", "rationale": f"because {i}"} for i in range(5)]
    kw = dict(prefixes=True, explain_inputs=True, rationale=True, max_input_length=32, max_target_length=16)
    first = tokenize_split(rows, tokenizer, causal, **kw)
    path = max((cache_dir() / "tokens").glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)  # the entry just written
    assert torch.load(path, weights_only=True) == first
    capsys.readouterr()
    for damage in (lambda p: _truncate(p), lambda p: p.write_bytes(b"\0" * 100),
                   lambda p: torch.save({"input_ids": [[1]], "labels": [[2]]}, p)):  # another entry's ids
        damage(path)
        again = tokenize_split(rows, tokenizer, causal, **kw)
        err = capsys.readouterr().err.strip().splitlines()
        assert again == first
        assert len(err) == 1 and err[0].startswith(f"warning: {path} is damaged (") and err[0].endswith("; rebuilt")
        assert torch.load(path, weights_only=True) == first  # rebuilt in place
    tokenize_split(rows, tokenizer, causal, **kw)
    assert capsys.readouterr().err == ""  # a whole entry: no warning


def test_a_damaged_converted_model_and_tokenizer_are_converted_again(tmp_path, monkeypatch, capsys):
    """The converted SmolLM2 (a copy of this session's, in a cache of its own) with its weights
    truncated, then its tokenizer overwritten: each use after a damage converts again, once."""
    from dsbs_ray.cache import check_model_dir
    from dsbs_ray.embedded import smollm2_path, smollm2_tokenizer_path

    source = smollm2_path()
    capsys.readouterr()
    monkeypatch.setenv("DSBS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "cache" / "models" / source.name
    shutil.copytree(source, model)
    assert smollm2_path() == model and capsys.readouterr().err == ""  # whole: used as is
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    _truncate(weights, 0.9)
    assert smollm2_path() == model
    err = capsys.readouterr().err
    assert f"warning: {model} is damaged (model.safetensors: " in err and "converting SmolLM2 again" in err
    assert weights.stat().st_size == size
    check_model_dir(model)
    assert not [p for p in model.parent.iterdir() if ".damaged." in p.name]  # the damaged copy is gone

    shutil.rmtree(model)  # the tokenizer alone (a trial that only counts teacher tokens)
    tok = smollm2_tokenizer_path()
    (tok / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    assert smollm2_tokenizer_path() == tok
    assert "tokenizer.json: not valid JSON" in capsys.readouterr().err
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tok)("The answer is 4").input_ids


def _rows(n):
    return [Example(str(i), f"question {i}", "(2)") for i in range(n)]


def _record(e, k):
    return {"row_key": annotations.row_key(e), "row_id": e.id, "sample": k, "raw": "r. The answer is 2.",
            "rationale": "r.", "label": "2", "parse_status": "ok", "output_tokens": 7}


def test_a_damaged_done_marker_is_a_miss_and_a_damaged_store_part_is_one_line_naming_it(tmp_path, capsys):
    rows = _rows(4)
    entry = annotations.open_entry(tmp_path, {"task": "svamp", "split": "train", "teacher": "t"})
    annotations.write_part(entry, [_record(e, 0) for e in rows[:2]])
    annotations.write_part(entry, [_record(e, 0) for e in rows[2:]])
    report = {"task": "svamp", "split": "train", "complete": True, "rows_total": 4}
    annotations.mark_finished(entry, rows, 1, report)
    marker = annotations.done_path(entry, rows, 1)
    for damage in ('{"task": "svamp", "spl', "[1, 2]"):
        marker.write_text(damage)
        assert annotations.finished_report(entry, rows, 1) is None
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"warning: {marker} is damaged (")
    annotations.mark_finished(entry, rows, 1, report)  # what the rerun's finish writes
    assert annotations.finished_report(entry, rows, 1) == report

    part = sorted((entry / "parts").glob("*.parquet"))[1]
    before = part.read_bytes()
    _truncate(part)
    for read in (lambda: annotations.done_samples(entry, [annotations.row_key(e) for e in rows], 1),
                 lambda: annotations.read_samples(entry, rows, 1)):
        with pytest.raises(UserError) as e:
            read()
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"annotation store: part {part} cannot be read (")
        assert "move it out of the store and rerun" in line
    assert part.exists() and len(part.read_bytes()) == len(before) // 2  # never removed or rewritten here


def test_a_damaged_layout_manifest_claims_nothing_and_annotate_refuses_to_overwrite(tmp_path, data_dir, capsys):
    from dsbs_ray.teacher import MANIFEST, AnnotateConfig, check

    task_dir = tmp_path / "ann" / "svamp"
    task_dir.mkdir(parents=True)
    (task_dir / "svamp_test.json").write_text("{}\n")
    (task_dir / MANIFEST).write_text('{"svamp_test.json": "ab')
    cfg = AnnotateConfig(task="svamp", split="test", data_dir=str(data_dir), out_dir=str(tmp_path / "ann"),
                         store=str(tmp_path / "store"))
    with pytest.raises(UserError, match="svamp_test.json exists and was not written by dsbs teacher"):
        check(cfg)
    assert f"warning: {task_dir / MANIFEST} is damaged (not valid JSON" in capsys.readouterr().err
    assert json.loads((task_dir / "svamp_test.json").read_text()) == {}  # untouched
