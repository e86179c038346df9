"""Decoder-only students: the embedded SmolLM2-135M-Instruct (real pretrained weights) through the
causal family. The reference for every loss is Hugging Face's own causal-LM loss, computed row by row
on sequences this file builds itself from the raw text."""
import json

import pytest
import torch

from dsbs_ray.data import EXPLAIN_PREFIX, PREDICT_PREFIX, prepare_data, tokenize_split
from dsbs_ray.embedded import SMOLLM2
from dsbs_ray.evaluate import evaluate
from dsbs_ray.families import causal, family_of
from dsbs_ray.job import load_config
from dsbs_ray.loss import multitask_loss
from dsbs_ray.students import fetch_student, load_student
from dsbs_ray.train import train

ROWS = [  # lengths vary, so every batch has padding
    {"id": str(i), "input": "Tom has " + "many " * (i % 4) + f"apples: {i}, and gets {i + 2} more. How many now?",
     "label": f"({i} + {i + 2})", "rationale": f"He had {i}, then {i + 2} more" + ", and more" * (i % 3) + "."}
    for i in range(6)
]


@pytest.fixture(scope="module")
def smollm2():
    student, tokenizer = load_student(fetch_student(SMOLLM2))
    assert family_of(student.config) is causal
    return student, tokenizer


def _tokens(tokenizer, dsbs=True):
    return tokenize_split(ROWS, tokenizer, causal, prefixes=dsbs, explain_inputs=dsbs, rationale=dsbs,
                          max_input_length=128, max_target_length=64)


def _hf_sums(student, tokenizer, prompts: list[str], targets: list[str]) -> tuple[float, int]:
    """(summed token loss, target tokens) from HF's own loss, one unpadded row at a time: the prompt
    text, the newline, then the target text and EOS, each tokenized here from its string, prompt
    positions labelled -100."""
    total, count = 0.0, 0
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] + tokenizer("\n", add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + t])
        labels = torch.tensor([[-100] * len(p) + t])
        total += student(input_ids=ids, labels=labels).loss.item() * len(t)
        count += len(t)
    return total, count


@pytest.mark.parametrize("alpha,packed", [(0.5, True), (0.2, True), (0.5, False)])
def test_causal_loss_equals_two_separate_hf_forward_passes(smollm2, alpha, packed):
    """Packed (SmolLM2 is a Llama: transformers masks packed sequences for it), and unpacked, one
    sequence per row, as a model that cannot mask them is trained."""
    student, tokenizer = smollm2
    batch = causal.collate(_tokens(tokenizer), list(range(len(ROWS))), causal.pad_id(tokenizer))
    n_label = int((batch["labels"] != -100).sum())
    n_rationale = int((batch["rationale_ids"] != -100).sum())
    module = causal.MultiTask(student)
    assert module.packed and causal.masks_packed_sequences(student)
    module.packed = packed
    with torch.no_grad():
        ours = multitask_loss(*module(**batch), alpha, n_label, n_rationale).item()
        pred_sum, pred_n = _hf_sums(student, tokenizer, [PREDICT_PREFIX + r["input"] for r in ROWS],
                                    [r["label"] for r in ROWS])
        expl_sum, expl_n = _hf_sums(student, tokenizer, [EXPLAIN_PREFIX + r["input"] for r in ROWS],
                                    [r["rationale"] for r in ROWS])
    assert (pred_n, expl_n) == (n_label, n_rationale)  # the loss counts exactly the target tokens + EOS
    reference = alpha * pred_sum / pred_n + (1 - alpha) * expl_sum / expl_n
    assert abs(ours - reference) < 1e-6 * max(1.0, reference), (ours, reference)


def test_causal_alpha_one_equals_standard_training(smollm2):
    """alpha = 1: the same loss and gradients as training on the predict sequences alone."""
    student, tokenizer = smollm2
    module = causal.MultiTask(student)
    batch = causal.collate(_tokens(tokenizer), list(range(len(ROWS))), causal.pad_id(tokenizer))
    n_label = int((batch["labels"] != -100).sum())

    def loss_and_grads(b):
        student.zero_grad()
        loss = multitask_loss(*module(**b), 1.0, n_label, 999)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    dsbs, g_dsbs = loss_and_grads(batch)
    predict_only = {k: v for k, v in _tokens(tokenizer).items() if k in ("input_ids", "labels")}
    standard, g_standard = loss_and_grads(causal.collate(predict_only, list(range(len(ROWS))), causal.pad_id(tokenizer)))
    student.zero_grad()
    assert abs(dsbs - standard) < 1e-6 and len(g_dsbs) == len(g_standard)
    # the same gradients up to float32 summation order (the predict sequences are packed differently
    # alone than beside the explain ones): measured ~3e-6 of each gradient's norm
    assert all((a - b).norm() <= 1e-5 * a.norm() + 1e-8 for a, b in zip(g_dsbs, g_standard))


def _segments(batch):
    """(row, start, end) of each sequence in a packed batch: its position ids run 0, 1, 2, ..."""
    out = []
    for r, positions in enumerate(batch["position_ids"].tolist()):
        starts = [j for j, pos in enumerate(positions) if pos == 0] + [len(positions)]
        out += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return out


def test_packed_rows_hold_each_sequence_once_masked_and_isolated(smollm2):
    student, tokenizer = smollm2
    tokens = _tokens(tokenizer)
    pad = causal.pad_id(tokenizer)
    batch = causal.collate(tokens, list(range(len(ROWS))), pad)
    assert set(batch) == {"input_ids", "position_ids", "labels", "rationale_ids"}
    expected = {}  # the token ids of each sequence -> (task, target)
    for i, row in enumerate(ROWS):
        for task, prompt, target, text in ((0, tokens["input_ids"][i], tokens["labels"][i], row["label"]),
                                           (1, tokens["expl_input_ids"][i], tokens["rationale_ids"][i], row["rationale"])):
            # the prompt is the input alone: no target text, no EOS; the target is the text then EOS
            prefix = PREDICT_PREFIX if task == 0 else EXPLAIN_PREFIX
            assert tokenizer.decode(prompt) == prefix + row["input"] + "\n"
            assert tokenizer.eos_token_id not in prompt and target[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(target, skip_special_tokens=True) == text
            expected[tuple(prompt + target)] = (task, len(prompt), target)
    width = batch["input_ids"].size(1)
    assert batch["input_ids"].size(0) < len(expected) and width <= max(causal.PACK_WIDTH, *map(len, expected))
    found, label_positions = [], 0
    for r, a, b in _segments(batch):
        ids = tuple(batch["input_ids"][r, a:b].tolist())
        if ids not in expected:  # the padding at a row's tail: nothing to learn there
            assert b == width and set(ids) == {pad}
            assert (batch["labels"][r, a:b] == -100).all() and (batch["rationale_ids"][r, a:b] == -100).all()
            continue
        task, n_prompt, target = expected[ids]
        found.append(ids)
        own, other = (batch["labels"], batch["rationale_ids"]) if task == 0 else (batch["rationale_ids"], batch["labels"])
        assert (own[r, a:a + n_prompt] == -100).all() and own[r, a + n_prompt:b].tolist() == target
        assert (other[r, a:b] == -100).all()
        label_positions += len(target)
    assert sorted(found) == sorted(expected) and label_positions == sum(len(t) for *_, t in expected.values())
    # attention cannot cross sequences: other tokens in the explain sequences and in the padding leave
    # the predict loss as it was (the sequences share rows with them)
    module = causal.MultiTask(student)
    noisy = dict(batch, input_ids=batch["input_ids"].clone())
    for r, a, b in _segments(batch):
        if not (batch["labels"][r, a:b] != -100).any():
            noisy["input_ids"][r, a:b] = torch.randint(0, tokenizer.vocab_size, (b - a,))
    assert any((batch["labels"][r] != -100).any() and (batch["rationale_ids"][r] != -100).any()
               for r in range(batch["input_ids"].size(0)))  # some row holds both tasks
    with torch.no_grad():
        clean, dirty = module(**batch), module(**noisy)
    assert abs(clean[0][0].item() - dirty[0][0].item()) < 1e-4 * clean[0][0].item()
    assert abs(clean[1][0].item() - dirty[1][0].item()) > 1e-2  # the explain loss did change
    # first-fit decreasing: every sequence in exactly one bin, no bin over its width
    lengths = [7, 3, 9, 1, 4, 4, 12]
    bins = causal.pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 or len(b) == 1 for b in bins) and len(bins) == 4
    # generation pads on the left: a batch decodes exactly as each row alone
    prompts = tokens["input_ids"]
    together = causal.generate_batch(student, tokenizer, prompts, 8, torch.device("cpu"), False)
    alone = [causal.generate_batch(student, tokenizer, [p], 8, torch.device("cpu"), False)[0] for p in prompts]
    assert together == alone


def test_causal_micro_batches_add_up_to_the_global_batch(smollm2):
    student, tokenizer = smollm2
    tokens = _tokens(tokenizer)
    module = causal.MultiTask(student)
    rows = list(range(len(ROWS)))
    n_label = sum(len(tokens["labels"][i]) for i in rows)
    n_rat = sum(len(tokens["rationale_ids"][i]) for i in rows)
    pad = causal.pad_id(tokenizer)
    with torch.no_grad():
        whole = multitask_loss(*module(**causal.collate(tokens, rows, pad)), 0.5, n_label, n_rat).item()
        parts = sum(multitask_loss(*module(**causal.collate(tokens, m, pad)), 0.5, n_label, n_rat).item()
                    for m in ([0, 3], [1, 4], [2, 5]))
    assert abs(whole - parts) < 1e-5


@pytest.mark.slow
def test_pretrained_student_learns_on_svamp_and_is_evaluated(data_dir, tmp_path):
    """A dozen steps of dsbs on an SVAMP slice: the loss falls; accuracy is measured before and
    after with the same evaluation (no bar on it: 135M parameters, 22 rows, about one epoch)."""
    cfg = load_config(task="svamp", student=SMOLLM2, method="dsbs", label_source="gold", fraction=0.03,
                      max_steps=12, batch_size=2, lr=1e-4, eval_every=6, eval_limit=10, test_limit=10, max_input_length=128,
                      max_target_length=64, gen_max_length=24, zero="off", data_dir=str(data_dir),
                      output_dir=str(tmp_path), explain=True)
    student, tokenizer = load_student(fetch_student(SMOLLM2))
    data = prepare_data(cfg, tokenizer, causal)
    before = evaluate(student, tokenizer, causal, data, "test", cfg, torch.device("cpu"), 0, 1, False)
    m = train(cfg, use_ray=False)
    print(json.dumps({"test_accuracy_before": before, "test_accuracy_after": m["accuracy"],
                      "first_loss": m["first_loss"], "final_loss": m["final_loss"],
                      "examples_per_s": m["examples_per_s"]}))
    assert m["family"] == "causal" and m["parameters"] == 134_515_008 and m["steps"] == 12
    assert m["final_loss"] < 0.8 * m["first_loss"], (m["first_loss"], m["final_loss"])
    lines = [json.loads(line) for line in open(m["predictions"])]
    assert len(lines) == 10 and all(isinstance(line["prediction"], str) for line in lines)
    assert "rationale" in lines[0]
    assert m["accuracy"] == sum(line["correct"] for line in lines) / 10
    # the exported student is a plain HF causal LM that loads and generates
    reloaded, _ = load_student(str(tmp_path / m["run_dir"].split("/")[-1] / "model"))
    assert family_of(reloaded.config) is causal
