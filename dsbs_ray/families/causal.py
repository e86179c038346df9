"""Decoder-only students (SmolLM2, Qwen, Llama, ...: any AutoModelForCausalLM).

Each task of a row is one sequence, prompt then target then EOS:

    predict: {x}\\n{label}<eos>          explain: {x}\\n{rationale}<eos>

with the loss on the target tokens only (prompt and padding are -100). Standard finetuning and
distillation train the predict sequence alone, on `{x}\\n{label}<eos>`. Training packs a micro-batch's
sequences into a few rows (attention cannot cross sequences; no padding but a row's tail) and runs
one forward for both tasks; generation pads on the left, so every prompt ends where the greedy
continuation starts.
"""

from __future__ import annotations

import torch

from dsbs_ray.loss import token_loss_sums

NAME = "causal"
PROMPT_END = "\n"  # separates the prompt from the target; tokenized on its own, so always the same ids

# model types whose logits are plain lm_head(hidden): the head then runs on target positions only
# (SmolLM2's head is 49k wide: most of a forward's cost on padding and prompt tokens otherwise)
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "smollm3"}


def auto_class():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load(path: str, device_type: str = "cpu"):
    """fp32 weights whatever the checkpoint's dtype (they are AdamW's master weights)."""
    return auto_class().from_pretrained(path, dtype=torch.float32)


def pad_id(tokenizer) -> int:
    """Many causal tokenizers have no pad token; padding is masked anyway, so EOS serves."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def nli_join(tokenizer) -> str:
    """Premise, then the hypothesis on the next line: an EOS inside a prompt would tell a causal LM
    that the text had ended."""
    return "\n"

def encode_prompts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """BOS where the tokenizer starts sequences with one, the text (cut to fit), then PROMPT_END;
    never an EOS (a byte-level T5 tokenizer would append one)."""
    if not texts:
        return []
    start = [tokenizer.bos_token_id] if (tokenizer.bos_token_id is not None and
                                         tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]) else []
    end = tokenizer(PROMPT_END, add_special_tokens=False)["input_ids"]
    keep = max(1, max_length - len(start) - len(end))
    return [start + ids[:keep] + end for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_targets(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """The text's tokens cut to max_length - 1, then EOS (what teaches the model to stop)."""
    if not texts:
        return []
    return [ids[:max_length - 1] + [tokenizer.eos_token_id]
            for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


PACK_WIDTH = 256  # packed rows are at least this wide: a few sequences share a row, and attention over
# 256 positions is a small part of a 135M-parameter forward (the linear layers dominate below ~1k)


def sequences(tokens: dict, rows: list[int]) -> list[tuple[list[int], list[int], int]]:
    """(prompt, target, task) for each sequence the rows train: task 0 predicts the label, task 1
    explains (dsbs; a row without a rationale has no explain sequence)."""
    out = [(tokens["input_ids"][i], tokens["labels"][i], 0) for i in rows]
    if "rationale_ids" in tokens:
        out += [(tokens["expl_input_ids"][i], tokens["rationale_ids"][i], 1) for i in rows if tokens["rationale_ids"][i]]
    return out


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` grouped into bins holding at most `width` tokens
    (a longer sequence gets a bin of its own). Deterministic: ties keep index order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(width - lengths[i])
    return bins


def collate(tokens: dict, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Every sequence of the rows (predict, and for dsbs explain), packed several to a row: each
    sequence's position ids restart at 0, which makes transformers' attention mask block-diagonal
    (a token sees only its own sequence: the same logits as the sequence alone). Rows are as wide as
    the longest sequence or PACK_WIDTH; the tail of a row is padding, a sequence of its own whose
    labels are masked. labels / rationale_ids hold each task's target tokens at their own positions
    (HF's convention: position t's logits predict label t + 1), -100 everywhere else."""
    seqs = sequences(tokens, indices)
    lengths = [len(p) + len(t) for p, t, _ in seqs]
    width = max([PACK_WIDTH, *lengths])
    bins = pack(lengths, width)
    width = max(sum(lengths[i] for i in b) for b in bins)  # no wider than the fullest row
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    targets = torch.full((2, len(bins), width), -100, dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            prompt, target, task = seqs[i]
            n = len(prompt) + len(target)
            ids[r, at:at + n] = torch.tensor(prompt + target, dtype=torch.long)
            positions[r, at:at + n] = torch.arange(n)
            targets[task, r, at + len(prompt):at + n] = torch.tensor(target, dtype=torch.long)
            at += n
        positions[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "position_ids": positions, "labels": targets[0]}
    if "rationale_ids" in tokens:
        batch["rationale_ids"] = targets[1]
    return batch


def length_key(tokens: dict, i: int) -> tuple[int, int]:
    """A row's sort key for bucketing: its longest sequence (what sets a packed row's width when it
    is long), then all its tokens."""
    lengths = [len(tokens["input_ids"][i]) + len(tokens["labels"][i])]
    if tokens.get("rationale_ids") and tokens["rationale_ids"][i]:
        lengths.append(len(tokens["expl_input_ids"][i]) + len(tokens["rationale_ids"][i]))
    return max(lengths), sum(lengths)


def masks_packed_sequences(student) -> bool:
    """Whether this model keeps attention inside each packed sequence: transformers builds the
    block-diagonal mask from restarting position ids in its masking utils (`create_causal_mask`, with
    no attention_mask), which Llama, Mistral, Qwen and most current causal LMs call. A model that
    does not is trained one sequence per row instead (MultiTask.unpack): exact either way."""
    import inspect

    try:
        return "create_causal_mask" in inspect.getsource(type(student.base_model).forward)
    except (OSError, TypeError):
        return False


def unpack(input_ids, position_ids, *targets):
    """The packed rows back as one right-padded row per sequence (ids, attention mask, targets)."""
    spans = []
    for r, positions in enumerate(position_ids.tolist()):
        starts = [j for j, pos in enumerate(positions) if pos == 0] + [len(positions)]
        spans += [(r, a, b) for a, b in zip(starts, starts[1:])
                  if any((t[r, a:b] != -100).any() for t in targets)]  # (a row's padded tail trains nothing)
    width = max(b - a for _, a, b in spans)
    ids = torch.zeros((len(spans), width), dtype=torch.long, device=input_ids.device)
    mask = torch.zeros_like(ids)
    out = [torch.full_like(ids, -100) for _ in targets]
    for i, (r, a, b) in enumerate(spans):
        ids[i, :b - a], mask[i, :b - a] = input_ids[r, a:b], 1
        for o, t in zip(out, targets):
            o[i, :b - a] = t[r, a:b]
    return ids, mask, out


class MultiTask(torch.nn.Module):
    """Wraps a causal LM; forward returns per-task (summed token loss, token count) from one forward
    over the packed rows (a model that cannot mask packed sequences gets them unpacked, one per row).
    For plain-head models the LM head and cross-entropy run on the target positions only."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.head_on_targets = student.config.model_type in PLAIN_HEAD
        self.packed = masks_packed_sequences(student)

    def forward(self, input_ids, labels, position_ids=None, rationale_ids=None, attention_mask=None):
        tasks = [labels] + ([] if rationale_ids is None else [rationale_ids])
        if position_ids is not None and not self.packed:
            input_ids, attention_mask, tasks = unpack(input_ids, position_ids, *tasks)
            position_ids = None
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        tasks = [t[:, 1:] for t in tasks]  # position t's logits predict token t + 1
        if not self.head_on_targets:
            logits = self.student(**kwargs).logits[:, :-1]
            sums = [token_loss_sums(logits, targets) for targets in tasks]
        else:
            hidden = self.student.base_model(**kwargs).last_hidden_state[:, :-1]
            head = self.student.get_output_embeddings()
            sums = [token_loss_sums(head(hidden[targets != -100]), targets[targets != -100]) for targets in tasks]
        return sums[0], (sums[1] if rationale_ids is not None else None)


def generate_batch(student, tokenizer, prompts: list[list[int]], max_new_tokens: int, device,
                   synced: bool) -> list[str]:
    """Greedy continuation of each prompt, left-padded; the text after the prompt, up to EOS."""
    pad = pad_id(tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[j, width - len(p):] = 1
    out = student.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                           max_new_tokens=max_new_tokens, synced_gpus=synced, pad_token_id=pad,
                           eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
