"""FastDecoder: a Llama-family decoder (llama, mistral, qwen2) over padding-free batches.

The same function as the model's own forward: each example of a packed row attends only to
itself (positions restart at every example), so no example sees another and no padding is
computed. q|k|v and gate|up run as one matmul each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlc.compiler.plan import BaseWeights
from qlc.trainer.fast.kernels import Attention, rms_norm, rope, silu_mul
from qlc.trainer.fast.loss import HeadLoss, HeadMatmul
from qlc.trainer.fast.precision import Dtypes
from qlc.trainer.fast.proj import Lora, Part, Proj, part_of
from qlc.trainer.fast.schedule import Packed, pack
from qlc.trainer.fast.stream import Parked, WeightStream
from qlc.trainer.types import Example


@dataclass
class Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Proj
    o: Proj
    gate_up: Proj
    down: Proj
    index: int

    @property
    def parts(self) -> list[Part]:
        return [p for proj in (self.qkv, self.o, self.gate_up, self.down) for p in proj.parts]


@dataclass(frozen=True)
class DecoderSetup:
    """How the decoder runs: the plan's settings plus what was decided at start."""

    device: torch.device
    dtypes: Dtypes
    base_weights: BaseWeights
    chunked_loss: bool
    attention: Attention
    head_matmul: HeadMatmul | None  # None: the fused, chunked cross-entropy


class FastDecoder:
    def __init__(self, model: Any, setup: DecoderSetup) -> None:
        base = model.get_base_model()
        config = base.config
        self.setup, self.device, self.dtypes = setup, setup.device, setup.dtypes
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.rotary = base.model.rotary_emb
        self.parked = Parked()
        self.stream: WeightStream | None = None
        self.training = True
        self.recompute = False  # every layer recomputed in the backward pass (set by the engine)
        self.embed, head = self._embed_and_head(model, base)
        self.head_loss = HeadLoss(head, self.dtypes.base, setup.head_matmul, setup.chunked_loss)
        act = self.dtypes.activations
        self.norm = base.model.norm.weight.detach().to(self.device, act)
        self.layers = [self._layer(i, layer) for i, layer in enumerate(base.model.layers)]
        if setup.base_weights == "streamed":
            bases = [[part.base for part in layer.parts] for layer in self.layers]
            self.stream = WeightStream(bases, self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _embed_and_head(self, model: Any, base: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings looked up where they are stored and cast per lookup; the head in the base
        matmul dtype (streamed: a copy on the GPU; full loss: one copy; chunked: cast per
        chunk, never copied whole)."""
        embed, head = base.model.embed_tokens.weight, base.lm_head.weight
        if self.setup.base_weights == "streamed":
            head_copy = head.detach().to(self.device, self.dtypes.base)
            self.parked.move(head, "cpu")
            for param in model.parameters():
                if param.requires_grad:  # the adapters train on the GPU
                    self.parked.move(param, self.device)
            return self.parked.move(embed, "cpu").detach(), head_copy
        if self.setup.chunked_loss:
            return embed.detach(), head.detach()
        return embed.detach(), head.detach().to(self.dtypes.base)

    def _layer(self, index: int, layer: Any) -> Layer:
        attn, mlp, act = layer.self_attn, layer.mlp, self.dtypes.activations
        dequantize = self.setup.base_weights == "dequantized"

        def proj(*modules: Any) -> Proj:
            parts = [part_of(m, self.dtypes.adapter) for m in modules]
            return Proj.build(parts, self.dtypes, dequantize)

        return Layer(
            in_norm=layer.input_layernorm.weight.detach().to(self.device, act),
            post_norm=layer.post_attention_layernorm.weight.detach().to(self.device, act),
            qkv=proj(attn.q_proj, attn.k_proj, attn.v_proj),
            o=proj(attn.o_proj),
            gate_up=proj(mlp.gate_proj, mlp.up_proj),
            down=proj(mlp.down_proj),
            index=index,
        )

    @property
    def loras(self) -> list[Lora]:
        return [p.lora for layer in self.layers for p in layer.parts if p.lora is not None]

    def weight_bytes(self) -> int:
        projs = [
            p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
        ]
        return sum(p.nbytes() for p in projs)

    def release(self) -> None:
        """Put every weight back where the model had it."""
        if self.stream is not None:
            self.stream.restore()
        self.parked.restore()
        self.layers, self.stream = [], None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- forward
    def loss_sum(self, batch: Packed) -> torch.Tensor:
        return self.head_loss(self.hidden(batch), batch.targets)

    def hidden(self, batch: Packed) -> torch.Tensor:
        """The final normalized hidden states of a packed batch, (T, hidden)."""
        x = self._embed(batch.input_ids)
        cos, sin = self.rotary(x[None], batch.position_ids[None])
        cos, sin = cos[0].to(x.dtype), sin[0].to(x.dtype)
        for layer in self.layers:
            if self.recompute and self.training:
                x = checkpoint(self._block, layer, x, batch, cos, sin, use_reentrant=False)
            else:
                x = self._block(layer, x, batch, cos, sin)
        return rms_norm(x, self.norm, self.eps)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        act = self.dtypes.activations
        if self.embed.device == ids.device:
            return F.embedding(ids, self.embed).to(act)
        rows = F.embedding(ids.cpu(), self.embed).to(act)  # streamed: looked up in host memory
        return rows.pin_memory().to(ids.device, non_blocking=True) if ids.is_cuda else rows

    def _block(
        self, layer: Layer, x: torch.Tensor, batch: Packed, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        if self.stream is None:
            return self._compute_block(layer, x, batch, cos, sin)
        parts = layer.parts
        for part, fetched in zip(parts, self.stream.get(layer.index), strict=True):
            part.streamed = fetched
        try:
            return self._compute_block(layer, x, batch, cos, sin)
        finally:
            for part in parts:
                part.streamed = None

    def _compute_block(
        self, layer: Layer, x: torch.Tensor, batch: Packed, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        h = rms_norm(x, layer.in_norm, self.eps)
        x = x + self._attention(layer, h, batch, cos, sin)
        gate, up = layer.gate_up(rms_norm(x, layer.post_norm, self.eps), self.training)
        (down,) = layer.down(silu_mul(gate, up), self.training)
        return x + down

    def _attention(
        self, layer: Layer, h: torch.Tensor, batch: Packed, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = h.shape[0]
        q, k, v = layer.qkv(h, self.training)
        q, k = rope(
            q.view(n, self.heads, self.head_dim), k.view(n, self.kv_heads, self.head_dim), cos, sin
        )
        out = self.setup.attention(q, k, v.view(n, self.kv_heads, self.head_dim), batch)
        (o,) = layer.o(out.reshape(n, self.heads * self.head_dim), self.training)
        return o

    @torch.no_grad()
    def greedy(self, prompt: list[int], new_tokens: int, stop: int | None) -> list[int]:
        """Greedy continuation (no cache: every token reruns the sequence, streamed weights
        included): the streamed setting's sample, where the model never sits on the GPU."""
        ids, training = list(prompt), self.training
        self.training = False  # dropout off
        try:
            for _ in range(new_tokens):
                example: Example = {"input_ids": ids, "labels": ids}
                h = self.hidden(pack([example], self.device))
                token = int(self.head_loss.logits(h[-1:]).argmax())
                ids.append(token)
                if token == stop:
                    break
        finally:
            self.training = training
        return ids[len(prompt) :]
