"""Benchmark inputs built locally (no hub): a 32,000-entry tokenizer and a random-weight model.

    python bench/assets.py --out DIR [--shape 7b|tiny] [--data PARQUET]

(--data defaults to the repository's data/guanaco-llama2-1k/train.parquet.)

writes DIR/config.json, DIR/model*.safetensors (float16) and the tokenizer files, once: an
existing DIR with a config.json is kept. The "7b" shape is Llama-2-7b-chat's (32 layers,
hidden 4096, MLP 11008, 32 heads, vocab 32000); "tiny" is a CPU-size model of the same
family for the CI variant. Throughput and memory depend on the shape, not the values.

The tokenizer is a byte-level BPE trained on the benchmark data, with Llama 2's special tokens
(<unk> 0, <s> 1, </s> 2) and its habit of adding <s> to every text (so the data's own leading
<s> is doubled unless a pipeline fixes it, as with the real tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

GUANACO = Path(__file__).resolve().parents[1] / "data" / "guanaco-llama2-1k" / "train.parquet"
SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab": 32000,
    },
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab": 4000,
    },
}


def read_texts(parquet: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [row["text"] for row in pq.read_table(parquet).to_pylist()]


def build_tokenizer(texts: list[str], vocab: int, out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out)
    return tok.get_vocab_size()


def build_model(shape: dict, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        dtype="float16",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out, max_shard_size="5GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--data", type=Path, default=GUANACO)
    args = parser.parse_args()
    if (args.out / "config.json").is_file():
        print(json.dumps({"assets": str(args.out), "built": False}))
        return
    start = time.perf_counter()
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shape = SHAPES[args.shape]
    vocab = build_tokenizer(read_texts(args.data), shape["vocab"], tmp)
    build_model(shape, tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(
        json.dumps(
            {
                "assets": str(args.out),
                "built": True,
                "shape": args.shape,
                "tokenizer_entries": vocab,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
