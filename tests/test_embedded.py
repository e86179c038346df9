"""The embedded SmolLM2: its tokenizer alone is what counting a teacher's tokens needs."""

from transformers import AutoTokenizer

from dsbs_ray.embedded import smollm2_path, smollm2_tokenizer_path
from dsbs_ray.prompts import load_prompt


def test_counting_tokens_reads_the_tokenizer_alone_and_never_converts_the_model(tmp_path, monkeypatch):
    """In a fresh cache the tokenizer comes from the GGUF's vocabulary (no weights written, the model
    not converted) and tokenizes as the converted checkpoint's does; once the model is converted,
    the model's own directory serves."""
    full = smollm2_path()  # the session's cache: converted once per test session
    monkeypatch.setenv("DSBS_CACHE", str(tmp_path))
    models = tmp_path / "models"
    assert smollm2_tokenizer_path() == models / "smollm2-135m-instruct-tokenizer"
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == ["smollm2-135m-instruct-tokenizer"]
    assert not list(models.rglob("*.safetensors"))
    texts = [load_prompt("svamp").prefix, "Ann has 3 apples and buys 5 more. How many?\n(3 + 5)", "ünïcödé 😀"]
    reference = AutoTokenizer.from_pretrained(full)
    tokenizer = AutoTokenizer.from_pretrained(models / "smollm2-135m-instruct-tokenizer")
    assert tokenizer(texts)["input_ids"] == reference(texts)["input_ids"]
    assert smollm2_tokenizer_path() == models / "smollm2-135m-instruct-tokenizer"  # kept, not read again
    (models / "smollm2-135m-instruct").symlink_to(full)  # as if converted on this node since
    assert smollm2_tokenizer_path() == models / "smollm2-135m-instruct"
