"""Make the tiny assets that `specs/tiny.toml` runs on: no hub, no GPU, a few hundred KB.

    python tools/make_tiny_assets.py          # writes specs/tiny/ and the chat/instruction data
    python tools/make_tiny_assets.py --check  # rebuilds in a temp dir, compares with the repo

What it writes, deterministically (same bytes on every run with the pinned stack):
- specs/tiny/data.jsonl: the 64 shortest rows of guanaco-llama2-1k (Apache-2.0; the copy in
  data/guanaco-llama2-1k/), field `text`, already in the Llama 2 chat form
  `<s>[INST] ... [/INST] ... </s>`.
- specs/tiny/model/: a random-weight LlamaForCausalLM (hidden 64, 2 layers, 4 heads,
  intermediate 128, init std 0.15, float32 safetensors) and a byte-level BPE tokenizer of
  1,024 entries trained on that data, which adds BOS `<s>` like Llama 2, ends with EOS `</s>`,
  has `<unk>` and no pad token (the training script picks one) and a Llama-2-style chat
  template.
- specs/chat/data.jsonl and specs/instruction/data.jsonl: small hand-written examples.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUANACO = ROOT / "data" / "guanaco-llama2-1k" / "train.parquet"
ROWS = 64
MAX_CHARS = 400
VOCAB_SIZE = 1024
SEED = 1234
SPECIAL = ["<unk>", "<s>", "</s>"]

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

CHAT_ROWS = [
    [("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")],
    [("user", "Name a primary colour."), ("assistant", "Red is a primary colour.")],
    [
        ("system", "You answer briefly."),
        ("user", "How many legs has a spider?"),
        ("assistant", "Eight."),
    ],
    [("user", "Say hello in Spanish."), ("assistant", "Hola.")],
    [("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5.")],
    [("user", "Give me a synonym for happy."), ("assistant", "Cheerful.")],
    [
        ("user", "Is the sun a star?"),
        ("assistant", "Yes, the sun is a star."),
        ("user", "How far is it?"),
        ("assistant", "About 150 million kilometres."),
    ],
    [("user", "What does a thermometer measure?"), ("assistant", "Temperature.")],
    [("user", "Translate 'cat' into German."), ("assistant", "Katze.")],
    [("user", "Which planet is largest?"), ("assistant", "Jupiter is the largest planet.")],
    [("user", "What colour is the sky on a clear day?"), ("assistant", "Blue.")],
    [("user", "Name an even prime number."), ("assistant", "2 is the only even prime.")],
    [
        ("system", "You are a helpful assistant."),
        ("user", "What is water made of?"),
        ("assistant", "Hydrogen and oxygen: H2O."),
    ],
    [("user", "What is the opposite of cold?"), ("assistant", "Hot.")],
    [("user", "How many days are in a week?"), ("assistant", "Seven days.")],
    [("user", "Who wrote Hamlet?"), ("assistant", "William Shakespeare.")],
]

INSTRUCTION_ROWS = [
    ("Add the two numbers.", "4 and 5", "9"),
    ("Name the capital city.", "Italy", "Rome"),
    ("Give the plural of the word.", "mouse", "mice"),
    ("Say good morning in French.", "", "Bonjour."),
    ("Reverse the word.", "stop", "pots"),
    ("Name a fruit that is yellow.", "", "A banana."),
    ("Convert to upper case.", "qlora", "QLORA"),
    ("What is the boiling point of water at sea level in Celsius?", "", "100 degrees."),
    ("Count the letters.", "hello", "5"),
    ("Give the opposite.", "up", "down"),
    ("Name the colour of grass.", "", "Green."),
    ("Multiply the two numbers.", "3 and 4", "12"),
    ("Translate into English.", "gato", "cat"),
    ("Name the first month of the year.", "", "January."),
    ("Give the past tense.", "run", "ran"),
    ("Is the number even or odd?", "7", "Odd."),
]


def guanaco_rows(path: Path) -> list[str]:
    """The shortest rows of guanaco (ties broken by position), in their original order."""
    import pyarrow.parquet as pq

    texts: list[str] = pq.read_table(path).column("text").to_pylist()
    short = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))[:ROWS]
    rows = [texts[i] for i in sorted(short)]
    too_long = [r for r in rows if len(r) > MAX_CHARS]
    if too_long:
        raise SystemExit(f"{len(too_long)} picked rows exceed {MAX_CHARS} characters")
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = LLAMA2_CHAT_TEMPLATE
    wrapped.save_pretrained(out)


def build_model(vocab_size: int, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        # Wider than Llama's 0.02 so that LoRA on a random model can move the loss visibly
        # within a few steps (at 0.02 the logits are nearly uniform and hard to shift).
        initializer_range=0.15,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def verify(model_dir: Path) -> None:
    """Load what was written the way the training script will, and check the traps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if len(tok) != VOCAB_SIZE:
        raise SystemExit(f"tokenizer loads with {len(tok)} entries, expected {VOCAB_SIZE}")
    ids = tok("hello world")["input_ids"]
    if ids[0] != tok.bos_token_id or tok.bos_token != "<s>" or tok.eos_token != "</s>":
        raise SystemExit(f"tokenizer does not add BOS <s> like Llama 2: {ids}")
    if tok.unk_token != "<unk>" or tok.chat_template is None:
        raise SystemExit("tokenizer lacks <unk> or its chat template")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if model.config.vocab_size != len(tok):
        raise SystemExit("model and tokenizer vocabularies differ")


def write_assets(root: Path) -> None:
    texts = guanaco_rows(GUANACO)
    write_jsonl(root / "tiny" / "data.jsonl", [{"text": t} for t in texts])
    model_dir = root / "tiny" / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, model_dir)
    build_model(VOCAB_SIZE, model_dir)
    verify(model_dir)
    chats = [{"messages": [{"role": r, "content": c} for r, c in row]} for row in CHAT_ROWS]
    write_jsonl(root / "chat" / "data.jsonl", chats)
    instructions = [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTION_ROWS]
    write_jsonl(root / "instruction" / "data.jsonl", instructions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed assets")
    args = parser.parse_args()
    specs = ROOT / "specs"
    if not args.check:
        write_assets(specs)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_assets(Path(tmp))
        names = ["tiny/data.jsonl", "chat/data.jsonl", "instruction/data.jsonl"]
        names += [f"tiny/model/{p.name}" for p in sorted((Path(tmp) / "tiny/model").iterdir())]
        changed = [n for n in names if not filecmp.cmp(Path(tmp) / n, specs / n, shallow=False)]
    for name in changed:
        print(f"differs: specs/{name}", file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
