"""Decoder-only students (SmolLM2, Qwen, Llama, ...: any AutoModelForCausalLM).

Each task of a row is one sequence, prompt then target then EOS:

    predict: {x}\\n{label}<eos>          explain: {x}\\n{rationale}<eos>

with the loss on the target tokens only (prompt and padding are -100). Standard finetuning and
distillation train the predict sequence alone, on `{x}\\n{label}<eos>`. Training pads on the right;
generation pads on the left, so every prompt ends where the greedy continuation starts.
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


def _join(prompts: list[list[int]], targets: list[list[int]], pad: int):
    """(ids, attention mask, labels): prompt + target per row, right-padded; labels hold the target
    tokens at their own positions (HF's convention: position t's logits predict label t + 1)."""
    width = max(1, max(len(p) + len(t) for p, t in zip(prompts, targets)))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t, dtype=torch.long)
        mask[i, :len(p) + len(t)] = 1
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t, dtype=torch.long)
    return ids, mask, labels


def collate(tokens: dict, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The predict sequences (and for dsbs the explain sequences), each padded to its own longest."""
    batch = {}
    batch["input_ids"], batch["attention_mask"], batch["labels"] = _join(
        [tokens["input_ids"][i] for i in indices], [tokens["labels"][i] for i in indices], pad_id)
    if "expl_input_ids" in tokens:
        batch["expl_input_ids"], batch["expl_attention_mask"], batch["rationale_ids"] = _join(
            [tokens["expl_input_ids"][i] for i in indices], [tokens["rationale_ids"][i] for i in indices], pad_id)
    return batch


class MultiTask(torch.nn.Module):
    """Wraps a causal LM; forward returns per-task (summed token loss, token count): one forward per
    task, each on its own sequences. For plain-head models the LM head and cross-entropy run on the
    target positions only."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.head_on_targets = student.config.model_type in PLAIN_HEAD

    def _task(self, input_ids, attention_mask, labels):
        targets = labels[:, 1:]  # position t predicts token t + 1
        if not self.head_on_targets:
            logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return token_loss_sums(logits[:, :-1], targets)
        hidden = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state[:, :-1]
        keep = targets != -100
        return token_loss_sums(self.student.get_output_embeddings()(hidden[keep]), targets[keep])

    def forward(self, input_ids, attention_mask, labels, expl_input_ids=None, expl_attention_mask=None,
                rationale_ids=None):
        pred = self._task(input_ids, attention_mask, labels)
        if expl_input_ids is None:
            return pred, None
        return pred, self._task(expl_input_ids, expl_attention_mask, rationale_ids)


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
