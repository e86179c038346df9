"""The training core without Ray: loss, batching, tokenization cache, the loop, evaluation."""
import json
from pathlib import Path

import pytest
import torch

from dsbs_ray.data import bucketed_batches, shard_batch, tokenize_split
from dsbs_ray.families import seq2seq
from dsbs_ray.families.seq2seq import MultiTask as MultiTaskSeq2Seq, collate
from dsbs_ray.students import TINY_STUDENTS, count_parameters, load_student
from dsbs_ray.job import load_config
from dsbs_ray.loss import multitask_loss
from dsbs_ray.train import train

ROWS = [
    {"id": str(i), "input": f"Tom has {i} apples and gets {i + 2} more.\nHow many now?",
     "label": f"({i} + {i + 2})", "rationale": f"He had {i}, then {i + 2} more, so {i} + {i + 2}."}
    for i in range(8)
]


def _tokens(tokenizer, dsbs=True):
    return tokenize_split(ROWS, tokenizer, seq2seq, prefixes=dsbs, explain_inputs=dsbs, rationale=dsbs,
                          max_input_length=128, max_target_length=64)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_dsbs_loss_equals_two_separate_forward_passes(students, alpha):
    student, tokenizer = load_student(str(students["t5-tiny-s"]))
    tokens = _tokens(tokenizer)
    batch = collate(tokens, list(range(8)), tokenizer.pad_token_id)
    n_label = int((batch["labels"] != -100).sum())
    n_rationale = int((batch["rationale_ids"] != -100).sum())
    ours = multitask_loss(*MultiTaskSeq2Seq(student)(**batch), alpha, n_label, n_rationale)
    l_pred = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    l_expl = student(input_ids=batch["expl_input_ids"], attention_mask=batch["expl_attention_mask"],
                     labels=batch["rationale_ids"]).loss
    assert abs(ours.item() - (alpha * l_pred + (1 - alpha) * l_expl).item()) < 1e-6 * max(1.0, ours.item())


def test_our_step_matches_the_unmodified_hf_model_the_paper_trains(students):
    """Our loaded student (fused GELU kernel) against the checkpoint as transformers builds it (T5 v1.1's
    gelu_new), two separate forward passes as the paper's code runs them: the loss to 1e-6 relative,
    and every gradient."""
    from transformers import AutoModelForSeq2SeqLM
    from transformers.activations import NewGELUActivation, PytorchGELUTanh

    student, tokenizer = load_student(str(students["t5-tiny-m"]))
    reference = AutoModelForSeq2SeqLM.from_pretrained(str(students["t5-tiny-m"]), attn_implementation="eager")
    assert any(type(m) is NewGELUActivation for m in reference.modules())
    assert not any(type(m) is NewGELUActivation for m in student.modules())
    assert any(type(m) is PytorchGELUTanh for m in student.modules())
    batch = collate(_tokens(tokenizer), list(range(8)), tokenizer.pad_token_id)
    n_label, n_rationale = int((batch["labels"] != -100).sum()), int((batch["rationale_ids"] != -100).sum())
    ours = multitask_loss(*MultiTaskSeq2Seq(student)(**batch), 0.5, n_label, n_rationale)
    l_pred = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    l_expl = reference(input_ids=batch["expl_input_ids"], attention_mask=batch["expl_attention_mask"],
                       labels=batch["rationale_ids"]).loss
    ref = 0.5 * l_pred + 0.5 * l_expl
    assert abs(ours.item() - ref.item()) < 1e-6 * max(1.0, ref.item())
    ours.backward()
    ref.backward()
    for (name, a), b in zip(student.named_parameters(), reference.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-5 * b.grad.norm(), (name, ((a.grad - b.grad).norm() / b.grad.norm()).item())


def test_alpha_one_reduces_to_standard_training(students):
    student, tokenizer = load_student(str(students["t5-tiny-s"]))
    tokens = _tokens(tokenizer)
    batch = collate(tokens, list(range(8)), tokenizer.pad_token_id)
    n_label = int((batch["labels"] != -100).sum())
    module = MultiTaskSeq2Seq(student)

    def grads(loss):
        student.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    dsbs = multitask_loss(*module(**batch), 1.0, n_label, 999)
    g_dsbs = grads(dsbs)
    standard_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    standard = multitask_loss(*module(**standard_batch), 1.0, n_label, 0)
    g_standard = grads(standard)
    assert abs(dsbs.item() - standard.item()) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_dsbs, g_standard))


def test_micro_batches_add_up_to_the_global_batch(students):
    """Gradient accumulation is exact: micro-batch losses normalised by global token counts sum to
    the loss of the whole batch in one piece."""
    student, tokenizer = load_student(str(students["t5-tiny-s"]))
    tokens = _tokens(tokenizer)
    module = MultiTaskSeq2Seq(student)
    rows = list(range(8))
    n_label = sum(len(tokens["labels"][i]) for i in rows)
    n_rat = sum(len(tokens["rationale_ids"][i]) for i in rows)
    whole = multitask_loss(*module(**collate(tokens, rows, 0)), 0.5, n_label, n_rat)
    costs = [len(x) for x in tokens["input_ids"]]
    parts = sum(multitask_loss(*module(**collate(tokens, m, 0)), 0.5, n_label, n_rat)
                for r in range(2) for m in shard_batch(rows, costs, 2, r, 2))
    assert abs(whole.item() - parts.item()) < 1e-5


def test_bucketed_batches_cover_each_row_once_and_group_lengths():
    costs = [(i * 37) % 101 for i in range(1000)]
    batches = bucketed_batches(costs, 16, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == bucketed_batches(costs, 16, seed=3, epoch=0)
    assert batches != bucketed_batches(costs, 16, seed=3, epoch=1)
    spread = sum(max(costs[i] for i in b) - min(costs[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of 16 over lengths 0..100 would spread ~90
    assert all(len(b) >= 8 for b in bucketed_batches(costs, 16, seed=3, epoch=0, min_size=8))


def test_shard_batch_partitions_rows_across_ranks_and_micro_batches():
    costs = list(range(64))
    batch = list(range(10, 42))
    shards = [m for rank in range(2) for m in shard_batch(batch, costs, world=2, rank=rank, accum=4)]
    assert len(shards) == 8 and sorted(i for m in shards for i in m) == batch
    assert {len(m) for m in shards} == {4}


def test_tokenize_cache_hit_and_key(students, tmp_path, monkeypatch):
    monkeypatch.setenv("DSBS_CACHE", str(tmp_path))
    _, tokenizer = load_student(str(students["t5-tiny-s"]))
    first = _tokens(tokenizer)
    files = list((tmp_path / "tokens").glob("*.pt"))
    assert len(files) == 1
    assert _tokens(tokenizer) == first and list((tmp_path / "tokens").glob("*.pt")) == files
    assert first["input_ids"][0][:9] == list(tokenizer("predict: ")["input_ids"][:9])
    tokenize_split(ROWS, tokenizer, seq2seq, prefixes=True, explain_inputs=True, rationale=True,
                   max_input_length=16, max_target_length=64)
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 2
    short = tokenize_split(ROWS, tokenizer, seq2seq, prefixes=True, explain_inputs=True, rationale=True,
                           max_input_length=16, max_target_length=8)
    assert max(len(x) for x in short["input_ids"]) == 16 and max(len(x) for x in short["rationale_ids"]) == 8


def test_tiny_students_have_three_growing_sizes(students):
    sizes = [count_parameters(load_student(str(students[name]))[0]) for name in TINY_STUDENTS]
    assert sizes == sorted(sizes) and sizes[0] > 100_000 and sizes[-1] < 20_000_000


@pytest.mark.parametrize("task, method, label_source", [("svamp", "dsbs", "gold"), ("cqa", "standard", "teacher")])
def test_tiny_student_learns_and_is_evaluated(students, data_dir, tmp_path, task, method, label_source):
    cfg = load_config(task=task, student=str(students["t5-tiny-s"]), method=method, label_source=label_source,
                      fraction=0.05, max_steps=30, batch_size=8, lr=3e-3, eval_every=15, eval_limit=12, test_limit=12,
                      max_input_length=192, max_target_length=48, gen_max_length=16, zero="off",
                      data_dir=str(data_dir), output_dir=str(tmp_path), explain=True)
    m = train(cfg, use_ray=False)
    assert m["steps"] == 30 and m["resumed_from_step"] == 0
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["valid_accuracy"] <= 1.0
    # finished: the exported student stays, no checkpoint (keep: model)
    assert m["examples_per_s"] > 0 and m["checkpoint"] is None and (Path(m["run_dir"]) / "model").is_dir()
    history = [json.loads(l) for l in open(m["predictions"])]
    assert len(history) == 12 and {"id", "input", "gold", "prediction", "correct"} <= set(history[0])
    assert ("rationale" in history[0]) == (method == "dsbs")
    assert m["final_loss"] < m["first_loss"] * 0.6, (m["first_loss"], m["final_loss"])


def test_a_random_t5_with_t5s_vocabulary_generates_only_what_its_byte_tokenizer_writes(tmp_path):
    """write_random_t5 with vocab_size past the byte tokenizer's (the GPU bench's T5 v1.1-base shape):
    generation never picks an id the tokenizer cannot decode, even where such ids score highest."""
    from transformers import AutoTokenizer

    from dsbs_ray.families.seq2seq import auto_class
    from dsbs_ray.students import write_random_t5

    path = write_random_t5(tmp_path / "wide", (32, 1, 64, 2), vocab_size=2048, seed=1)
    model, tokenizer = auto_class().from_pretrained(path), AutoTokenizer.from_pretrained(path)
    wider = torch.arange(2048) >= len(tokenizer)  # these ids outscore every byte, whatever the hidden state
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + 100.0 * wider)
    ids = tokenizer(["Tom has 3 apples.", "How many now?"], return_tensors="pt", padding=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert int(out.max()) < len(tokenizer) and len(tokenizer.batch_decode(out)) == 2
    unsuppressed = model.generate(**ids, do_sample=False, max_new_tokens=6, min_new_tokens=6, suppress_tokens=[])
    assert int(unsuppressed.max()) >= len(tokenizer)  # what would have happened
