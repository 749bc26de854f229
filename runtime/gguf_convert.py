"""Run llama.cpp's own converter (convert_hf_to_gguf.py) in a child process, with one addition.

    python -m qlc.runtime.gguf_convert LLAMA_CPP_DIR MODEL_DIR --outfile F --outtype T

llama.cpp names a BPE tokenizer's pre-tokenizer (tokenizer.ggml.pre) by hashing the token ids
of a fixed probe text: that identifies pretrained tokenizers it knows, and any tokenizer with a
vocabulary of its own (one trained for a small model, as qlc's tiny model has) gets an unknown
hash and the converter stops ("BPE pre-tokenizer was not recognized"). The hash is a stand-in
for the tokenizer's configuration, so when it is unknown this wrapper reads the configuration
itself: a tokenizer.json with no normalizer and exactly the GPT-2 byte-level pre-tokenizer
(ByteLevel, regex on, no prefix space) is llama.cpp's "gpt-2" pre-tokenizer. Anything else
still stops the conversion. `qlc merge --format gguf` then checks the result: llama.cpp must
tokenize the probe text and the held-out prompts exactly as the HF tokenizer does.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

GPT2_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
FALLBACK_LOG = "qlc: unknown BPE pre-tokenizer hash; tokenizer.json configures {}: using {!r}"


def pre_tokenizer_from_config(model_dir: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer tokenizer.json configures, when qlc knows it."""
    try:
        config = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("normalizer") is not None:
        return None
    if config.get("pre_tokenizer") == GPT2_BYTE_LEVEL:
        return "gpt-2"
    return None


def with_config_fallback(text_model: Any) -> None:
    """Wrap TextModel.get_vocab_base_pre: an unknown hash falls back to the configuration."""
    original = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            name = pre_tokenizer_from_config(Path(self.dir_model))
            if name is None:
                raise
            logging.getLogger("qlc").warning(FALLBACK_LOG.format(GPT2_BYTE_LEVEL, name))
            return name

    text_model.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    llama_cpp_dir, args = Path(argv[0]), argv[1:]
    sys.path[:0] = [str(llama_cpp_dir), str(llama_cpp_dir / "gguf-py")]
    import convert_hf_to_gguf  # llama.cpp's converter, from llama_cpp_dir
    from conversion.base import TextModel

    with_config_fallback(TextModel)
    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
