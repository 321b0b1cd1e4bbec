"""A tuned model's LoRA adapter as a GGUF LoRA file, the form llama.cpp applies at run time.

llama.cpp reads an adapter GGUF with `general.type = "adapter"`, the base model's architecture,
`adapter.type = "lora"` and `adapter.lora.alpha`; each adapted weight `W` named like the base
GGUF's tensor (`blk.3.attn_q.weight`) gets `….lora_a` (r, in) and `….lora_b` (out, r), shaped as
PEFT's A and B, and adds `scale · x Aᵀ Bᵀ` with `scale = alpha / r`. The adapters written here
carry PEFT's scaling folded into B (fp32) and `alpha = r`, so llama.cpp's scale is 1 whatever
PEFT's rule was (rsLoRA included).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Gemma 3's projections under their llama.cpp tensor names (no q/k row permutation for Gemma).
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
SUPPORTED_ARCHITECTURES = frozenset({"gemma3"})


def write_gguf_lora(
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], arch: str, out: Path
) -> None:
    """Write `weights` ((layer, projection) → (A, s·B), see `fast_decode.read_plain_lora`) as a
    GGUF LoRA adapter for an `arch` base model; whole or not at all (temp file, rename)."""
    from gguf import GGUFWriter

    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"no LoRA tensor names for a {arch!r} GGUF")
    ranks = {a.shape[0] for a, _ in weights.values()}
    if len(ranks) != 1:
        raise ValueError(f"one rank for every projection expected, got {sorted(ranks)}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(str(tmp), arch)
    try:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(ranks.pop()))  # scale = alpha / r = 1
        for (layer, proj), (a, b) in sorted(weights.items()):
            name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
            writer.add_tensor(f"{name}.lora_a", a.float().contiguous().numpy())
            writer.add_tensor(f"{name}.lora_b", b.float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
