"""Model shapes and GPU sizes for the preflight memory estimate, as typed, frozen data.

The known shapes and GPUs are package data (compiler/data/shapes.toml) read with
importlib.resources, so the estimate stays pure. A local model directory's config.json is
read by the CLI and handed in as a mapping (`shape_from_config`); nothing here touches files
outside the package, the network or the environment.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from qlc.userio import clip

GIB = 2**30
MIB = 2**20
# The decoders whose config.json the estimate reads (model_type): Llama-family layers of q, k,
# v, o and a gated MLP, whatever their names, norms and attention pattern.
MODELLED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj")  # Phi-3's names for q|k|v and gate|up
# transformers' defaults where a config.json leaves a key out.
TIED_BY_DEFAULT = ("gemma2", "gemma3_text")
NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4}  # also before and after the MLP
QK_NORM = ("qwen3", "gemma3_text")  # an RMSNorm of head_dim on each query and key


class UnknownShape(ValueError):
    """The model's shape is not known: the estimate would be a guess, so there is none."""


class UnknownGpu(ValueError):
    """A GPU name that is not in the table."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a Llama-family decoder."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    source: str
    head_dim: int | None = None
    norms_per_layer: int = 2
    qk_norm: bool = False

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def projection(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection of a decoder layer."""
        q, kv, h, i = (
            self.heads * self.head_size,
            self.kv_heads * self.head_size,
            self.hidden,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
            "qkv_proj": (h, q + 2 * kv),
            "gate_up_proj": (h, 2 * i),
        }[name]

    @property
    def linear_params(self) -> int:
        """Weights of every decoder layer's projections (what 4-bit quantization packs)."""
        per_layer = sum(a * b for a, b in (self.projection(p) for p in PROJECTIONS))
        return per_layer * self.layers

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the lm_head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        qk = 2 * self.head_size * self.layers if self.qk_norm else 0
        return (self.norms_per_layer * self.layers + 1) * self.hidden + qk


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    source: str
    bf16: bool | None = True  # computes bfloat16 natively; None: unknown (a memory size only)


def _shape(row: Mapping[str, Any]) -> ModelShape:
    return ModelShape(
        name=str(row["name"]),
        hidden=int(row["hidden"]),
        intermediate=int(row["intermediate"]),
        layers=int(row["layers"]),
        heads=int(row["heads"]),
        kv_heads=int(row["kv_heads"]),
        vocab=int(row["vocab"]),
        tied_embeddings=bool(row["tied_embeddings"]),
        source=str(row["source"]),
        head_dim=int(row["head_dim"]) if "head_dim" in row else None,
    )


@cache
def _table() -> dict[str, Any]:
    text = resources.files("qlc.compiler").joinpath("data/shapes.toml").read_text("utf-8")
    return tomllib.loads(text)


def known_shape(model_id: str | None = None, model_path: str | None = None) -> ModelShape | None:
    """The table's shape for a hub id (case-insensitive) or a spec's model.path, if listed."""
    for row in _table()["model"]:
        ids = {str(i).lower() for i in row["ids"]}
        if model_id is not None and model_id.lower() in ids:
            return _shape(row)
        if model_path is not None and model_path.rstrip("/") in row["paths"]:
            return _shape(row)
    return None


def known_model_names() -> list[str]:
    return [str(row["name"]) for row in _table()["model"]]


def shape_from_config(config: Mapping[str, Any], source: str) -> ModelShape:
    """A shape from a transformers config.json (already parsed); UnknownShape if it is not one
    of the decoders the estimate models. A multimodal Gemma 3 is read from its text_config."""
    model_type = config.get("model_type")
    if model_type not in MODELLED_TYPES:
        raise UnknownShape(
            f"{source}: model_type {model_type!r} is not modelled "
            f"(the estimate knows {', '.join(MODELLED_TYPES)})"
        )
    if model_type == "gemma3":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise UnknownShape(f"{source}: a gemma3 config.json without a text_config")
        name = config.get("_name_or_path")
        config, model_type = {"_name_or_path": name, **text}, "gemma3_text"
    needed = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    missing = [key for key in needed if not isinstance(config.get(key), int)]
    if missing:
        raise UnknownShape(f"{source}: config.json lacks integer {', '.join(missing)}")
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    kv_heads = config.get("num_key_value_heads")
    head_dim = config.get("head_dim")
    return ModelShape(
        name=str(config.get("_name_or_path") or source),
        hidden=hidden,
        intermediate=int(config["intermediate_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(kv_heads) if isinstance(kv_heads, int) else heads,
        vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
        source=source,
        head_dim=head_dim if isinstance(head_dim, int) and head_dim * heads != hidden else None,
        norms_per_layer=NORMS_PER_LAYER.get(str(model_type), 2),
        qk_norm=model_type in QK_NORM,
    )


def _gpu_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = _table()["gpu"]
    return rows


def known_gpus() -> list[str]:
    return [str(row["name"]) for row in _gpu_rows()]


# "24GB", "24 GiB", "80G": a card given by its memory alone. GB is read as GiB, the way card
# makers' "24 GB" boards hold 24 GiB.
MEMORY_SIZE = re.compile(r"^\s*(\d{1,4}(?:\.\d{1,2})?)\s*(?:g|gb|gib)\s*$", re.IGNORECASE)


def find_gpu(name: str) -> Gpu:
    """A GPU by name or accepted spelling, case-insensitive, or by its memory size ("24GB");
    UnknownGpu lists the known ones."""
    wanted = " ".join(name.lower().replace("_", " ").split())
    for row in _gpu_rows():
        spellings = [str(row["name"]), *(str(n) for n in row["names"])]
        if wanted in {" ".join(s.lower().replace("_", " ").split()) for s in spellings}:
            return Gpu(str(row["name"]), int(row["memory_mib"]) * MIB, str(row["source"]),
                       bool(row.get("bf16", True)))  # fmt: skip
    size = MEMORY_SIZE.match(name)
    if size is not None and float(size.group(1)) > 0:
        gib = float(size.group(1))
        return Gpu(f"a card of {gib:g} GiB", round(gib * GIB), "--gpu as a memory size", None)
    raise UnknownGpu(
        f"unknown GPU {clip(repr(name))}: use one of {', '.join(known_gpus())}, or a memory "
        "size such as 24GB (names are matched case-insensitively)"
    )
