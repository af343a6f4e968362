"""The decoder forward of Llama-family models (Llama, Mistral, Qwen2) over the static cache, without
transformers' per-module plumbing: the same operators in the same order, so the same bits.

On the CPU an eager step is bound by how many operators and Python calls it makes, not only by its GEMMs:
transformers' layers go through module hooks, keyword plumbing, deprecation wrappers and the attention
registry at every layer, and a fused projection group (`fused_linears`) hands each sibling a contiguous copy
of its columns. Here each layer is a flat list of operators: one GEMM per fused group, its members as views,
the rotary embedding with the sign of `rotate_half` folded into the sine table (negation is exact, so
q·cos + rotate_half(q)·sin keeps its bits), and keys/values written in place by `StaticKV`'s own cache. The numbers
are transformers' own (tested bit for bit against it, prefill, decode and verify, every quantised format),
so every identity the services promise holds on this path too. Other families keep transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minedraft.engine import slot_attention
from minedraft.engine.fused_linears import GroupMember
from minedraft.engine.static_kv import SlotCache

FAMILIES = frozenset({"llama", "mistral", "qwen2"})


@dataclass
class Projections:
    """Linears that read one input: one fused group's GEMM (its members' columns as views), or each alone."""

    linears: list[torch.nn.Module]
    bounds: list[int] | None = None  # a fused group's column bounds; None: call each linear

    @classmethod
    def of(cls, members: list[torch.nn.Module]) -> Projections:
        groups = {m.group for m in members if isinstance(m, GroupMember)}
        if len(groups) == 1 and all(isinstance(m, GroupMember) for m in members):
            group = groups.pop()
            if [m.member for m in members] == list(range(len(group.bounds) - 1)):
                return cls([group.linear], group.bounds)
        return cls(members)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.bounds is None:
            return [linear(x) for linear in self.linears]
        out = self.linears[0](x)
        return [out[..., lo:hi] for lo, hi in zip(self.bounds, self.bounds[1:], strict=False)]


@dataclass
class Layer:
    input_norm: tuple[torch.Tensor, float]
    qkv: Projections
    o_proj: torch.nn.Module
    sliding_window: int | None
    post_norm: tuple[torch.Tensor, float]
    gate_up: Projections
    down_proj: torch.nn.Module


def supported(model: torch.nn.Module) -> bool:
    """Whether this model's layers are the plain Llama shape this forward reproduces."""
    config = model.config
    if config.model_type not in FAMILIES or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(config, "pretraining_tp", 1) != 1 or getattr(config, "mlp_bias", False):
        return False
    layer = model.model.layers[0]
    return all(hasattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")) and \
        all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))


def _sliding_window(config, attention: torch.nn.Module) -> int | None:
    """The window each family's attention passes on: Qwen2 per layer, Mistral from its config, Llama none."""
    if config.model_type == "qwen2":
        return getattr(attention, "sliding_window", None)
    return getattr(config, "sliding_window", None) if config.model_type == "mistral" else None


def _norm(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
    return module.weight, module.variance_epsilon


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """transformers' LlamaRMSNorm/Qwen2RMSNorm, operator for operator."""
    weight, eps = norm
    wide = x.to(torch.float32)
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(x.dtype)


class LeanForward:
    """logits = model(step) for a static-cache step (StaticKV.inputs), read in place by the rows attention."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = model.model
        self.embed, self.rotary, self.lm_head = inner.embed_tokens, inner.rotary_emb, model.lm_head
        self.final_norm = _norm(inner.norm)
        attention = inner.layers[0].self_attn
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.layers = [self._layer(model.config, layer) for layer in inner.layers[:model.config.num_hidden_layers]]

    @staticmethod
    def _layer(config, layer: torch.nn.Module) -> Layer:
        attention, mlp = layer.self_attn, layer.mlp
        return Layer(_norm(layer.input_layernorm),
                     Projections.of([attention.q_proj, attention.k_proj, attention.v_proj]), attention.o_proj,
                     _sliding_window(config, attention), _norm(layer.post_attention_layernorm),
                     Projections.of([mlp.gate_proj, mlp.up_proj]), mlp.down_proj)

    def __call__(self, step: dict[str, torch.Tensor], cache: SlotCache, logits_to_keep: int) -> torch.Tensor:
        hidden = self.embed(step["input_ids"])
        cos, sin = self.rotary(hidden, step["position_ids"])
        half = cos.shape[-1] // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, None]  # rotate_half's sign
        cos = cos[:, None]
        batch, n = step["input_ids"].shape
        memo: dict = {}
        for index, layer in enumerate(self.layers):
            residual = hidden
            q, k, v = self._rotated_qkv(layer.qkv, _rms_norm(hidden, layer.input_norm), cos, signed_sin, half)
            key, value = cache.update(k, v, index)
            attended = slot_attention.rows(q, key, value, self.scaling, layer.sliding_window, None, step, memo)
            hidden = residual + layer.o_proj(attended.reshape(batch, n, -1))
            residual = hidden
            gate, up = layer.gate_up(_rms_norm(hidden, layer.post_norm))
            # silu's exp may round differently on a strided view (vector body vs scalar tail per row): contiguous,
            # as transformers' path hands it
            hidden = residual + layer.down_proj(F.silu(gate.contiguous()) * up)
        hidden = _rms_norm(hidden, self.final_norm)
        return self.lm_head(hidden[:, -logits_to_keep:, :])

    def _rotated_qkv(self, qkv: Projections, normed: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                     half: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k rotated, and v, each [batch, heads, n, head_dim]. A fused group's q and k columns lie side by
        side, so they rotate as one tensor: the same elementwise operators, half the calls."""
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(*normed.shape[:2], -1, self.head_dim).transpose(1, 2)

        if qkv.bounds is None:
            q, k, v = qkv(normed)
            return _rotated(heads(q), cos, signed_sin, half), _rotated(heads(k), cos, signed_sin, half), heads(v)
        out = qkv.linears[0](normed)
        q_end, k_end, v_end = qkv.bounds[1:4]
        qk = _rotated(heads(out[..., :k_end]), cos, signed_sin, half)
        q_heads = q_end // self.head_dim
        return qk[:, :q_heads], qk[:, q_heads:], heads(out[..., k_end:v_end])


def _rotated(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, half: int) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, rotate_half's negation carried by `signed_sin` (exact: the same bits)."""
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * signed_sin
