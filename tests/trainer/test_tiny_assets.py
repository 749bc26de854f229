"""The tiny assets in specs/ that the trainer's tests train on are what tools/make_tiny_assets.py
makes, and load as intended (a Llama 2 like tokenizer with its traps)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from trainer_support import REPO, SPECS, TINY_DATA, TINY_MODEL

GUANACO = REPO / "data" / "guanaco-llama2-1k" / "train.parquet"


def test_the_guanaco_data_is_the_published_file() -> None:
    """The tests, the tiny assets and the benchmark read the repository's copy: it must be
    the published parquet its README names."""
    readme = (GUANACO.parent / "README.md").read_text()
    digest = hashlib.sha256(GUANACO.read_bytes()).hexdigest()
    assert f"sha256: {digest}" in readme


def test_committed_assets_are_reproducible() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tiny_assets.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_tiny_model_is_small_and_its_tokenizer_is_llama_like() -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert sum(p.stat().st_size for p in TINY_MODEL.iterdir()) < 2_000_000
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    config = AutoConfig.from_pretrained(TINY_MODEL)
    assert len(tokenizer) == config.vocab_size == 1024  # not the 3-token trap of LlamaTokenizer
    ids = tokenizer("<s>[INST] hi [/INST] yo </s>")["input_ids"]
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.bos_token_id]  # the doubled-BOS trap
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.pad_token is None
    assert config.hidden_size % 64 == 0 and config.intermediate_size % 64 == 0
    rows = TINY_DATA.read_text().splitlines()
    assert len(rows) == 64 and all('"text": "<s>[INST]' in row for row in rows)
    for name in ("chat", "instruction"):
        assert len((SPECS / name / "data.jsonl").read_text().splitlines()) == 16
