"""Student checkpoints: finding and loading any HF seq2seq or causal LM (its family decides how, see
dsbs_ray.families), the embedded pretrained student, and tiny random-init T5s for CPU work.

The tiny students are T5 v1.1-shaped (gated-GELU, unscaled decoder outputs) with the byte-level ByT5
tokenizer, which needs no vocabulary file, so the size axis of a sweep is real on a laptop with no hub.
`embedded:smollm2-135m-instruct` is SmolLM2-135M-Instruct, the one pretrained model every box has
(dsbs_ray.embedded): a real decoder-only student with no download.
"""

from __future__ import annotations

from pathlib import Path

from dsbs_ray.embedded import SMOLLM2, smollm2_path
from dsbs_ray.errors import UserError

EMBEDDED_STUDENTS = {SMOLLM2: smollm2_path}  # name -> the function that gives its local checkpoint

# name -> (d_model, layers per stack, d_ff, heads); roughly 0.2M, 1.3M and 6M parameters
TINY_STUDENTS = {
    "t5-tiny-s": (64, 2, 128, 2),
    "t5-tiny-m": (128, 3, 256, 4),
    "t5-tiny-l": (256, 4, 512, 4),
}
T5_V1_1_BASE = (768, 12, 2048, 12)  # google/t5-v1_1-base's shape (with vocabulary 32128)


def write_random_t5(path: Path | str, shape: tuple[int, int, int, int], vocab_size: int | None = None,
                    seed: int = 0) -> Path:
    """A random-init T5 v1.1-shaped student of `shape` (gated-GELU, unscaled decoder outputs) with the
    byte-level ByT5 tokenizer, written to path. vocab_size defaults to the tokenizer's 384; a larger
    one (T5 v1.1's 32128) gives the real model's embedding and LM-head cost, bytes using its first ids
    (generation never writes the others). transformers 5 ties every T5's LM head to its embeddings, so
    the v1.1-base shape counts ~223M parameters where the released checkpoint has ~248M."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    d_model, layers, d_ff, heads = shape
    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=vocab_size or len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff,
        num_layers=layers, num_decoder_layers=layers, num_heads=heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    if config.vocab_size > len(tokenizer):  # ids past the bytes are never generated: nothing could write them
        model.generation_config.suppress_tokens = list(range(len(tokenizer), config.vocab_size))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def make_tiny_students(out_dir: Path | str, seed: int = 0) -> dict[str, Path]:
    """Write the tiny students (model + tokenizer) under out_dir/<name>; returns name -> path."""
    return {name: write_random_t5(Path(out_dir) / name, shape, seed=seed) for name, shape in TINY_STUDENTS.items()}


def resolve_student(student: str) -> str:
    """An embedded student's local checkpoint (converted once per node); any other name unchanged."""
    return str(EMBEDDED_STUDENTS[student]()) if student in EMBEDDED_STUDENTS else student


def check_student(student: str) -> None:
    """Fail early, before any worker starts, if the student checkpoint cannot be found."""
    if student.startswith("embedded:"):
        if student not in EMBEDDED_STUDENTS:
            raise UserError(f"student {student}: unknown embedded student (known: {', '.join(EMBEDDED_STUDENTS)})")
        resolve_student(student)  # converted now, so a missing package is one line before any worker starts
        return
    from transformers import AutoConfig

    from dsbs_ray.families import check_family

    path = Path(student)
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"student {student}: no config.json in that directory (not an HF checkpoint)")
        check_family(AutoConfig.from_pretrained(path), student)
        return
    if student.startswith((".", "/", "~")) or student.count("/") != 1:
        raise UserError(f"student checkpoint {student} does not exist")
    try:  # a hub id such as google/t5-v1_1-base: found in the local HF cache or on the hub
        config = AutoConfig.from_pretrained(student)
    except (OSError, ValueError) as e:
        raise UserError(f"student {student}: not a local path and not loadable from the HF hub "
                        f"({str(e).splitlines()[0]})") from None
    check_family(config, student)


def fetch_student(student: str) -> str:
    """A local directory holding the student. A hub id is downloaded once per node: the first process
    to take the node's lock (in the HF cache) downloads, the others wait, then read the cache."""
    if student in EMBEDDED_STUDENTS or Path(student).exists():
        return resolve_student(student)
    import hashlib

    from filelock import FileLock
    from huggingface_hub import constants, snapshot_download

    lock = Path(constants.HF_HUB_CACHE) / ".locks" / f"dsbs-{hashlib.sha256(student.encode()).hexdigest()[:16]}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        try:
            return snapshot_download(student, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached (or partly): download what a student needs
            return snapshot_download(student, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                              "*.txt", "*.tiktoken"])


def load_student(student: str, device_type: str = "cpu"):
    """(model, tokenizer) from a local path (fetch_student gives one); the model's family
    (dsbs_ray.families.family_of) decides the class. Weights in fp32 whatever the checkpoint's dtype:
    they are the master weights AdamW updates (bf16 is compute only, under autocast)."""
    from transformers import AutoTokenizer

    from dsbs_ray.families import family_for

    return family_for(student).load(student, device_type), AutoTokenizer.from_pretrained(student)


def load_tokenizer(student: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_student(student))


def count_parameters(model) -> int:
    """Parameter count; under ZeRO-3 a rank holds only a shard, DeepSpeed keeps the full size in ds_numel."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def estimate_parameters(student: str) -> int | None:
    """Parameter count from the config alone (a meta-device model: no weights read), None if unknown."""
    import torch
    from transformers import AutoConfig

    from dsbs_ray.families import family_of

    try:
        config = AutoConfig.from_pretrained(resolve_student(student))
        with torch.device("meta"):
            model = family_of(config).auto_class().from_config(config)
    except (OSError, ValueError):
        return None
    return count_parameters(model)
