"""A hand-written Gemma 3 forward for decoding: one function over the layers, a preallocated KV
cache, fused projections, optional int8 weight-only matmuls, and LoRA kept unmerged.

The transformers forward spends most of a single-token step in module calls, mask building and
cache bookkeeping; here a step is ~25 tensor ops per layer. Numerics follow the transformers
Gemma 3 code op for op (RMSNorm in fp32 with (1 + w), bf16 rotary tables, gelu-tanh, the
embedding scaled by a bf16 sqrt(hidden)), and a LoRA delta is added as PEFT adds it: the input
cast to the adapter's dtype, x @ A.T @ B.T * scaling added to the base output, cast back.

`weights="int8"` adds an int8 copy of every projection and of the tied 262k-token output head,
one bf16 scale per output channel (`aten._weight_int8pack_mm`): a decode step reads half the
bytes (it is memory-bound); the prompt still runs on the bf16 weights.

Only what the Gemma 3 text models use is supported; `FastGemma3.supports(model)` says whether a
model qualifies and `FastLora.from_peft` returns None for an adapter it cannot run (DoRA,
targets outside the seven projections, ...): the caller then uses the transformers path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

Weights = Literal["bf16", "int8"]
_DROPOUTS = (torch.nn.Identity, torch.nn.Dropout)  # identities in eval mode
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input run as one matmul: (group, members).
_GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
           ("gu", ("gate_proj", "up_proj")), ("down", ("down_proj",)))  # fmt: skip


class Linear:
    """y = x @ W.T for a fixed weight given as row blocks (fused projections).

    bf16 keeps the model's own tensors (no copy) and runs one matmul per block; int8 holds one
    fused int8 copy with a bf16 scale per output channel for small batches (decode steps), and
    the bf16 blocks for prompts, where the int8 kernel is slower than bf16 and less exact.
    """

    INT8_MAX_ROWS = 8  # at most this many input rows take the int8 kernel

    def __init__(self, parts: Sequence[torch.Tensor], weights: Weights) -> None:
        self.parts = [p.detach() for p in parts]
        self.out_features = sum(p.shape[0] for p in self.parts)
        self.q: torch.Tensor | None = None
        if weights == "int8":
            w = torch.cat(self.parts).float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(self.parts[0].dtype)
            w.div_(scale.float()[:, None]).round_().clamp_(-127, 127)
            self.q = w.to(torch.int8).contiguous()
            self.scale = scale.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.numel() // shape[-1]
        if self.q is not None and rows <= self.INT8_MAX_ROWS:
            y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(
                x.reshape(rows, shape[-1]), self.q, self.scale
            )
            return y.view(*shape[:-1], self.out_features)
        if len(self.parts) == 1:
            return F.linear(x, self.parts[0])
        return torch.cat([F.linear(x, p) for p in self.parts], dim=-1)


@dataclass
class _LoraPair:
    """One fused group's LoRA: x @ a.T @ b.T, `b` block-diagonal with each member's scaling."""

    a: torch.Tensor  # (r_total, in)
    b: torch.Tensor  # (out_total, r_total)

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x.to(self.a.dtype), self.a), self.b)
        return (base + delta).to(base.dtype)


class FastLora:
    """One adapter's LoRA weights, regrouped to match the fused projections (small: r x d)."""

    def __init__(self, layers: list[dict[str, _LoraPair]]) -> None:
        self.layers = layers

    @classmethod
    def from_peft(cls, peft_model: Any, adapter: str, fast: FastGemma3) -> FastLora | None:
        """The adapter `adapter` loaded in `peft_model`, or None when it uses anything else
        than plain LoRA on the seven per-layer projections."""
        from peft.tuners.lora import LoraLayer

        found: dict[tuple[int, str], Any] = {}
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            has = adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {})
            if not has:
                continue
            parts = name.split(".")
            if (
                len(parts) < 3
                or parts[-1] not in PROJECTIONS
                or not parts[-3].isdigit()
                or parts[-4] != "layers"
                or adapter not in module.lora_A
                or adapter in getattr(module, "lora_variant", {})  # DoRA and friends
                or getattr(module, "use_dora", {}).get(adapter, False)
                or module.lora_B[adapter].bias is not None
                or module.lora_A[adapter].bias is not None
                or not isinstance(module.lora_dropout[adapter], _DROPOUTS)
            ):
                return None
            found[(int(parts[-3]), parts[-1])] = module
        if not found:
            return None
        layers: list[dict[str, _LoraPair]] = []
        for i in range(fast.n_layers):
            groups: dict[str, _LoraPair] = {}
            for group, members in _GROUPS:
                present = [m for m in members if (i, m) in found]
                if not present:
                    continue
                a_parts, blocks = [], []
                for m in members:
                    out = fast.out_features[m]
                    if m in present:
                        mod = found[(i, m)]
                        a = mod.lora_A[adapter].weight.detach()
                        b = mod.lora_B[adapter].weight.detach() * mod.scaling[adapter]
                        a_parts.append(a)
                        blocks.append((b, out))
                    else:
                        blocks.append((None, out))
                dtype = a_parts[0].dtype
                r_total = sum(a.shape[0] for a in a_parts)
                b_full = torch.zeros(sum(o for _, o in blocks), r_total, dtype=dtype)
                row = col = 0
                for b, out in blocks:
                    if b is not None:
                        b_full[row : row + out, col : col + b.shape[1]] = b.to(dtype)
                        col += b.shape[1]
                    row += out
                a_full = torch.cat([a.to(dtype) for a in a_parts]).to(fast.device)
                groups[group] = _LoraPair(a_full.contiguous(), b_full.to(fast.device).contiguous())
            layers.append(groups)
        return cls(layers)


@dataclass
class _Layer:
    sliding: bool
    qkv: Linear
    o: Linear
    gu: Linear
    down: Linear
    ln_in: torch.Tensor  # (1 + w) in fp32, as Gemma3RMSNorm computes it
    ln_post_attn: torch.Tensor
    ln_pre_ff: torch.Tensor
    ln_post_ff: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor


class KVCache:
    """Per layer K and V: full layers hold every position, sliding layers a ring of `window`."""

    def __init__(self, fast: FastGemma3, batch: int, max_len: int) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.sizes: list[int] = []
        for layer in fast.layers:
            size = min(fast.window, max_len) if layer.sliding else max_len
            shape = (batch, fast.n_kv, size, fast.head_dim)
            self.k.append(torch.empty(shape, dtype=fast.dtype, device=fast.device))
            self.v.append(torch.empty(shape, dtype=fast.dtype, device=fast.device))
            self.sizes.append(size)
        self.length = 0  # positions written so far
        self.max_len = max_len

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index`."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]

    def repeat(self, n: int) -> None:
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]


class FastGemma3:
    """Gemma 3 text decoding with the weights of a transformers `Gemma3ForCausalLM`."""

    EXACT_TOP = 32  # int8 head: this many best logits are recomputed with the bf16 weights

    @staticmethod
    def supports(model: Any) -> bool:
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "gemma3_text":
            return False
        rope = getattr(config, "rope_parameters", None) or {}
        return (
            not getattr(config, "use_bidirectional_attention", False)
            and getattr(config, "attn_logit_softcapping", None) is None
            and not getattr(config, "attention_bias", False)
            and getattr(config, "hidden_activation", None) == "gelu_pytorch_tanh"
            and all(
                isinstance(rope.get(t), dict) and rope[t].get("rope_type") == "default"
                for t in set(config.layer_types)
            )
        )

    def __init__(self, model: Any, weights: Weights = "bf16") -> None:
        config = model.config
        body = model.model
        self.weights = weights
        self.config = config
        self.dtype: torch.dtype = body.embed_tokens.weight.dtype
        self.device: torch.device = body.embed_tokens.weight.device
        self.n_layers = config.num_hidden_layers
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.hidden = config.hidden_size
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.embed = body.embed_tokens.weight  # shared with the model: no copy
        self.embed_scale = body.embed_tokens.embed_scale.to(self.dtype)
        self.inv_freq = {
            t: 1.0
            / (
                config.rope_parameters[t]["rope_theta"]
                ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)
            ).to(self.device)
            for t in set(config.layer_types)
        }
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv * self.head_dim
        self.out_features = {
            "q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out, "o_proj": self.hidden,
            "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size,
            "down_proj": self.hidden,
        }  # fmt: skip

        def w(module: Any) -> torch.Tensor:
            # A PEFT-wrapped projection keeps the frozen weight in `base_layer`.
            module = getattr(module, "base_layer", module)
            weight: torch.Tensor = module.weight
            return weight

        self.layers: list[_Layer] = []
        for i, layer in enumerate(body.layers[: self.n_layers]):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    sliding=config.layer_types[i] == "sliding_attention",
                    qkv=Linear([w(attn.q_proj), w(attn.k_proj), w(attn.v_proj)], weights),
                    o=Linear([w(attn.o_proj)], weights),
                    gu=Linear([w(mlp.gate_proj), w(mlp.up_proj)], weights),
                    down=Linear([w(mlp.down_proj)], weights),
                    ln_in=_norm_weight(layer.input_layernorm),
                    ln_post_attn=_norm_weight(layer.post_attention_layernorm),
                    ln_pre_ff=_norm_weight(layer.pre_feedforward_layernorm),
                    ln_post_ff=_norm_weight(layer.post_feedforward_layernorm),
                    q_norm=_norm_weight(attn.q_norm),
                    k_norm=_norm_weight(attn.k_norm),
                )
            )
        self.final_norm = _norm_weight(body.norm)
        self.head = Linear([model.lm_head.weight], weights)  # tied to the embedding
        self._head_weight = model.lm_head.weight
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_len = 0

    # -- public --------------------------------------------------------------------------------
    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        self._ensure_rope(max_len)
        return KVCache(self, batch, max_len)

    def prefill(self, ids: Sequence[int], cache: KVCache, lora: FastLora | None) -> torch.Tensor:
        """Run the prompt into an empty `cache`; return the last position's hidden (1, C)."""
        t = len(ids)
        if t > cache.max_len:
            raise ValueError("the prompt does not fit the cache")
        self._ensure_rope(cache.max_len)
        x = F.embedding(torch.tensor([ids], device=self.device), self.embed) * self.embed_scale
        window_mask = None
        if t > self.window and any(layer.sliding for layer in self.layers):
            pos = torch.arange(t, device=self.device)
            offset = pos[:, None] - pos[None, :]
            window_mask = (offset >= 0) & (offset < self.window)
        for i, layer in enumerate(self.layers):
            cos, sin = self._rope["sliding" if layer.sliding else "full"]
            cos, sin = cos[:t], sin[:t]
            h = _rms(x, layer.ln_in, self.eps)
            qkv = layer.qkv(h)
            if lora is not None and "qkv" in lora.layers[i]:
                qkv = lora.layers[i]["qkv"].add_to(qkv, h)
            q, k, v = self._split_heads(qkv, t)  # (1, H, T, D)
            q = _rope(_rms(q, layer.q_norm, self.eps), cos, sin)
            k = _rope(_rms(k, layer.k_norm, self.eps), cos, sin)
            size = cache.sizes[i]
            keep = range(max(0, t - size), t)  # a ring keeps the last `size` positions
            slots = torch.tensor([p % size for p in keep], device=self.device)
            cache.k[i][:, :, slots] = k[:, :, keep.start :]
            cache.v[i][:, :, slots] = v[:, :, keep.start :]
            if layer.sliding and window_mask is not None:
                a = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=window_mask, scale=self.scaling, enable_gqa=True
                )
            else:
                a = F.scaled_dot_product_attention(
                    q, k, v, is_causal=t > 1, scale=self.scaling, enable_gqa=True
                )
            x = self._after_attention(x, a.transpose(1, 2).reshape(1, t, -1), layer, i, lora)
        cache.length = t
        return _rms(x[:, -1], self.final_norm, self.eps)

    def step(self, tokens: torch.Tensor, cache: KVCache, lora: FastLora | None) -> torch.Tensor:
        """Feed one token per batch row (B,) at the next position; return hidden (B, C)."""
        pos = cache.length
        if pos >= cache.max_len:
            raise ValueError("the cache is full")
        b = tokens.shape[0]
        x = F.embedding(tokens, self.embed) * self.embed_scale  # (B, C)
        rope = {k: (c[pos], s[pos]) for k, (c, s) in self._rope.items()}
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        for i, layer in enumerate(self.layers):
            cos, sin = rope["sliding" if layer.sliding else "full"]
            h = _rms(x, layer.ln_in, self.eps)
            qkv = layer.qkv(h)
            if lora is not None and "qkv" in lora.layers[i]:
                qkv = lora.layers[i]["qkv"].add_to(qkv, h)
            q = qkv[:, : nh * hd].view(b, nh, 1, hd)
            k = qkv[:, nh * hd : (nh + nkv) * hd].view(b, nkv, 1, hd)
            v = qkv[:, (nh + nkv) * hd :].view(b, nkv, 1, hd)
            q = _rope(_rms(q, layer.q_norm, self.eps), cos, sin)
            k = _rope(_rms(k, layer.k_norm, self.eps), cos, sin)
            size = cache.sizes[i]
            slot = pos % size
            ck, cv = cache.k[i], cache.v[i]
            ck[:, :, slot : slot + 1] = k
            cv[:, :, slot : slot + 1] = v
            n = min(pos + 1, size)  # every filled slot is inside the window: no mask
            a = F.scaled_dot_product_attention(
                q, ck[:, :, :n], cv[:, :, :n], scale=self.scaling, enable_gqa=True
            )
            x = self._after_attention(x, a.reshape(b, nh * hd), layer, i, lora)
        cache.length = pos + 1
        return _rms(x, self.final_norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, C) → (B, V) float32 logits."""
        logits = self.head(hidden)
        if self.head.q is not None:
            # The int8 head's best candidates get their exact bf16 logits back, so greedy picks
            # what the bf16 head would whenever the winner is among them (a gap of ~0.1 can
            # reorder int8 logits, a much larger one cannot).
            top = logits.topk(self.EXACT_TOP, dim=-1).indices  # (B, k)
            rows = self._head_weight[top]  # (B, k, C)
            exact = torch.matmul(rows, hidden.unsqueeze(-1)).squeeze(-1)  # (B, k)
            logits = logits.scatter(-1, top, exact.to(logits.dtype))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    # -- internals -----------------------------------------------------------------------------
    def _after_attention(
        self, x: torch.Tensor, a: torch.Tensor, layer: _Layer, i: int, lora: FastLora | None
    ) -> torch.Tensor:
        groups = lora.layers[i] if lora is not None else {}
        o = layer.o(a)
        if "o" in groups:
            o = groups["o"].add_to(o, a)
        x = x + _rms(o, layer.ln_post_attn, self.eps)
        h = _rms(x, layer.ln_pre_ff, self.eps)
        gu = layer.gu(h)
        if "gu" in groups:
            gu = groups["gu"].add_to(gu, h)
        gate, up = gu.chunk(2, dim=-1)
        m = F.gelu(gate, approximate="tanh") * up
        d = layer.down(m)
        if "down" in groups:
            d = groups["down"].add_to(d, m)
        return x + _rms(d, layer.ln_post_ff, self.eps)

    def _split_heads(
        self, qkv: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        q = qkv[..., : nh * hd].view(1, t, nh, hd).transpose(1, 2)
        k = qkv[..., nh * hd : (nh + nkv) * hd].view(1, t, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd :].view(1, t, nkv, hd).transpose(1, 2)
        return q, k, v

    def _ensure_rope(self, length: int) -> None:
        """cos/sin tables for positions < length, computed as Gemma3RotaryEmbedding does."""
        if length <= self._rope_len:
            return
        length = max(length, 2 * self._rope_len, 512)
        positions = torch.arange(length, device=self.device).float()
        for t, inv_freq in self.inv_freq.items():
            freqs = positions[:, None] * inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            key = "sliding" if t == "sliding_attention" else "full"
            self._rope[key] = (emb.cos().to(self.dtype), emb.sin().to(self.dtype))
        self._rope_len = length


def _norm_weight(norm: Any) -> torch.Tensor:
    weight: torch.Tensor = norm.weight.detach().float()
    return (1.0 + weight).contiguous()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight).type_as(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
