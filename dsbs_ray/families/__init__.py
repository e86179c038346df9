"""Student families. A family is one small module with the same names:

    NAME                                  how runs and reports call it
    auto_class()                          the transformers Auto class its models load with
    load(path, device_type)               the HF model, fp32 master weights
    nli_join(tokenizer)                   what stands between an NLI premise and hypothesis
    encode_prompts(tokenizer, texts, n)   token ids of `predict: x` / `explain: x` (what the model conditions on)
    encode_targets(tokenizer, texts, n)   token ids of a label or rationale, ending in EOS
    pad_id(tokenizer)                     the id padding is written with (always masked)
    length_key(tokens, i)                 row i's sort key for length-bucketed batches
    collate(tokens, rows, pad_id)         a training micro-batch (tensors)
    MultiTask(student)                    forward(**batch) -> per task (summed token loss, token count)
    generate_batch(student, tokenizer, prompts, max_new_tokens, device, synced)   greedy target texts

The loop, the backends and the sessions never look inside a family.
"""

from __future__ import annotations

from dsbs_ray.errors import UserError
from dsbs_ray.families import causal, seq2seq


def family_of(config):
    """The family of an HF model config: encoder-decoder models are seq2seq, the rest causal LMs."""
    return seq2seq if getattr(config, "is_encoder_decoder", False) else causal


def family_for(student: str):
    """The family of a local checkpoint directory or hub id (reads its config only)."""
    from transformers import AutoConfig

    return family_of(AutoConfig.from_pretrained(student))


def check_family(config, student: str) -> None:
    """One line, before any worker starts, for a checkpoint that is neither a seq2seq nor a causal LM."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    known = (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES if family_of(config) is seq2seq
             else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if config.model_type not in known:
        raise UserError(f"student {student}: a {config.model_type!r} model is neither a seq2seq LM nor a causal LM "
                        "(what AutoModelForSeq2SeqLM / AutoModelForCausalLM load)")
