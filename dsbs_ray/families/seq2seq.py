"""Encoder-decoder students (T5 and any AutoModelForSeq2SeqLM), as in the paper's code: the encoder
reads `predict: x` / `explain: x`, the decoder writes the label / rationale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsbs_ray.loss import token_loss_sums

NAME = "seq2seq"


def auto_class():
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM


def load(path: str, device_type: str = "cpu"):
    """fp32 weights whatever the checkpoint's dtype (they are AdamW's master weights). On CPU, T5 gets
    eager attention: its relative position bias keeps the fused SDPA kernels from helping, and eager
    measured ~3 % faster per training step here. T5 v1.1's gated-GELU is computed by torch's fused
    kernel (fused_gelu)."""
    kwargs = {"attn_implementation": "eager"} if device_type == "cpu" else {}
    return fused_gelu(auto_class().from_pretrained(path, dtype=torch.float32, **kwargs))


def fused_gelu(model):
    """T5 v1.1's "gelu_new" is the tanh-approximate GELU written as six elementwise ops in Python, each a
    pass over the FFN activations forward and more backward; torch's `gelu(approximate="tanh")` is the
    same function in one kernel each way (losses agree to ~1e-7 relative). Measured on CPU: ~5-10 %
    of a tiny T5's training step. The config is untouched: a saved student still says gelu_new."""
    from transformers.activations import NewGELUActivation, PytorchGELUTanh

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, PytorchGELUTanh())
    return model


def nli_join(tokenizer) -> str:
    """Premise and hypothesis joined by EOS, as the paper's T5 inputs are."""
    return tokenizer.eos_token

def encode_prompts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """The tokenizer's own special tokens (T5: a closing EOS), cut at max_length."""
    return tokenizer(list(texts), max_length=max_length, truncation=True)["input_ids"] if texts else []


encode_targets = encode_prompts  # T5 targets are tokenized like inputs: text then EOS


def collate(tokens: dict, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder inputs padded to this batch's longest row; decoder targets padded with -100."""
    batch = {}
    batch["input_ids"], batch["attention_mask"] = pad([tokens["input_ids"][i] for i in indices], pad_id)
    batch["labels"], _ = pad([tokens["labels"][i] for i in indices], -100)
    if "expl_input_ids" in tokens:
        batch["expl_input_ids"], batch["expl_attention_mask"] = pad(
            [tokens["expl_input_ids"][i] for i in indices], pad_id)
        batch["rationale_ids"], _ = pad([tokens["rationale_ids"][i] for i in indices], -100)
    return batch


def length_key(tokens: dict, i: int) -> tuple[int, int]:
    """A row's sort key for bucketing: input length first (the encoder runs over it once per task and
    attention grows with its square; measured on CQA it pads least), then target length."""
    target = tokens["rationale_ids"][i] if "rationale_ids" in tokens else tokens["labels"][i]
    return len(tokens["input_ids"][i]), len(target)


def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded ids, attention mask) for a list of token-id lists, padded to the longest (at least 1
    wide: a batch of rows without rationale targets still has a shape, all padding)."""
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return out, mask


class MultiTask(torch.nn.Module):
    """Wraps a seq2seq student; forward returns per-task (summed token loss, token count).

    Where the paper's code runs two full forward passes on batches padded to their longest row, this
    does the same arithmetic with less padding:
    - the predict and explain inputs go through the encoder as one batch;
    - each task runs its own decoder pass, so short labels are not padded to rationale length;
    - rationales are decoded in `rationale_groups` groups of similar length, each trimmed to its
      own longest rationale and input;
    - for T5 the LM head and cross-entropy run only on real target positions, not on padding.
    """

    def __init__(self, student, rationale_groups: int = 2):
        super().__init__()
        self.student = student
        self.rationale_groups = rationale_groups
        self.t5_head = getattr(student.config, "model_type", None) in ("t5", "mt5")

    def _decode_once(self, encoder_hidden, attention_mask, labels):
        decoder_input_ids = self.student.prepare_decoder_input_ids_from_labels(labels=labels)
        if not self.t5_head:
            out = self.student(encoder_outputs=(encoder_hidden,), attention_mask=attention_mask,
                               decoder_input_ids=decoder_input_ids, use_cache=False)
            return token_loss_sums(out.logits, labels)
        hidden = self.student.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden,
                                            encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = labels != -100
        hidden = hidden[keep]
        if self.student.config.scale_decoder_outputs:  # as T5ForConditionalGeneration.forward
            hidden = hidden * (self.student.config.d_model ** -0.5)
        return token_loss_sums(self.student.lm_head(hidden), labels[keep])

    def _decode(self, encoder_hidden, attention_mask, labels, groups: int = 1):
        if groups == 1 or labels.size(0) < 2 * groups:
            return self._decode_once(encoder_hidden, attention_mask, labels)
        target_lengths = (labels != -100).sum(1)
        loss, count = 0.0, 0
        for rows in torch.argsort(target_lengths, descending=True).chunk(groups):
            width = int(attention_mask[rows].sum(1).max())
            group_loss, group_count = self._decode_once(encoder_hidden[rows, :width], attention_mask[rows, :width],
                                                        labels[rows, :max(1, int(target_lengths[rows].max()))])
            loss, count = loss + group_loss, count + group_count
        return loss, count

    def forward(self, input_ids, attention_mask, labels, expl_input_ids=None, expl_attention_mask=None,
                rationale_ids=None):
        encoder = self.student.get_encoder()
        if expl_input_ids is None:
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self._decode(hidden, attention_mask, labels), None
        n = input_ids.size(0)
        width = max(input_ids.size(1), expl_input_ids.size(1))
        pad_id = self.student.config.pad_token_id
        ids = torch.cat([F.pad(input_ids, (0, width - input_ids.size(1)), value=pad_id),
                         F.pad(expl_input_ids, (0, width - expl_input_ids.size(1)), value=pad_id)])
        mask = torch.cat([F.pad(attention_mask, (0, width - attention_mask.size(1))),
                          F.pad(expl_attention_mask, (0, width - expl_attention_mask.size(1)))])
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return (self._decode(hidden[:n], mask[:n], labels),
                self._decode(hidden[n:], mask[n:], rationale_ids, groups=self.rationale_groups))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id


def generate_batch(student, tokenizer, prompts: list[list[int]], max_new_tokens: int, device,
                   synced: bool) -> list[str]:
    """Greedy decoding; the encoder inputs are right-padded (the decoder starts fresh per row)."""
    ids, mask = pad(prompts, pad_id(tokenizer))
    out = student.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           num_beams=1, max_new_tokens=max_new_tokens, synced_gpus=synced)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
