"""LoRA for training: lean adapter layers, injected into a base model or (for a forward that reads
the frozen weights itself) made from its layers' shapes alone, saved in PEFT's format.

PEFT's own layers cast every activation to the fp32 adapter dtype and back and run a Python loop
per call; on a CPU with a small batch that overhead rivals the matmuls. Here the fp32 master
weights are cast to the activation dtype (bf16) once per call — mixed precision, as autocast
would do — and the files written are exactly what `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tunery.engine.specs import LoraSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# PEFT names a CausalLM's weights "base_model.model.<module path>.lora_{A,B}.weight".
PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """`base(x) + dropout(x) @ Aᵀ @ Bᵀ · alpha/r`; only A and B train (B starts at zero)."""

    def __init__(self, base: nn.Linear, spec: LoraSpec, device: torch.device | None = None) -> None:
        """`device`: where A and B live, `base`'s by default (a shape-only `base` on the meta
        device serves a forward that reads the frozen weights elsewhere: `lora_layers`)."""
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init, on the CPU
        self.scaling = spec.alpha / spec.rank
        self.dropout = spec.dropout
        target = device if device is not None else base.weight.device
        for p in (self.lora_A, self.lora_B):
            p.data = p.data.to(target)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, so code that reads `module.weight` sees through the wrapper."""
        weight: torch.Tensor = self.base.weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        h = nn.functional.dropout(x, self.dropout, self.training) if self.dropout else x
        a = self.lora_A.to(x.dtype)  # (r, in)
        b = self.lora_B.to(x.dtype) * self.scaling  # (out, r)
        return out + (h @ a.t()) @ b.t()


def _targets(model: nn.Module, spec: LoraSpec) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(module path, parent, attribute, linear) for each targeted linear layer."""
    for path, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if attr in spec.target_modules and isinstance(child, nn.Linear):
                yield (f"{path}.{attr}" if path else attr), module, attr, child


def resolved_for(model: nn.Module, spec: LoraSpec) -> LoraSpec:
    """`spec`, or with its fallback targets when `model` has none of its target modules (with
    no fallback, `spec` as is: `lora_injected` then names the targets that matched nothing)."""
    if not spec.fallback_modules or any(True for _ in _targets(model, spec)):
        return spec
    return replace(spec, target_modules=spec.fallback_modules, fallback_modules=())


def lora_layers(
    shapes: Mapping[str, tuple[int, int]], spec: LoraSpec, device: torch.device
) -> dict[str, LoraLinear]:
    """A LoRA layer for each targeted linear of `shapes` (module path → (in, out) features, in
    the model's module order), with no model: for a forward that reads the frozen weights
    itself (`fast_train`). The same order and initialisation as `lora_injected` on the model."""
    layers: dict[str, LoraLinear] = {}
    for path, (n_in, n_out) in shapes.items():
        if path.rpartition(".")[2] in spec.target_modules:
            shape_only = nn.Linear(n_in, n_out, bias=False, device="meta")
            layers[path] = LoraLinear(shape_only, spec, device)
    if not layers:
        raise ValueError(f"no layer of the model matches target modules {spec.target_modules}")
    return layers


@contextmanager
def lora_injected(model: nn.Module, spec: LoraSpec) -> Iterator[dict[str, LoraLinear]]:
    """Wrap the targeted layers of `model` for the duration; the base is restored on exit."""
    layers: dict[str, LoraLinear] = {}
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for path, parent, attr, linear in _targets(model, spec):
            layers[path] = LoraLinear(linear, spec)
            setattr(parent, attr, layers[path])
        if not layers:
            raise ValueError(f"no layer of the model matches target modules {spec.target_modules}")
        yield layers
    finally:
        for path, layer in layers.items():
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, layer.base)
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)


def trainable_parameters(layers: dict[str, LoraLinear]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]


def adapter_state(layers: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's key names, detached (not copies: the optimizer goes on
    writing into them, so a caller copies or writes them out before the next step)."""
    state: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.detach()
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.detach()
    return state


def load_adapter_state(layers: dict[str, LoraLinear], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for path, layer in layers.items():
            layer.lora_A.copy_(state[f"{PEFT_PREFIX}{path}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{PEFT_PREFIX}{path}.lora_B.weight"])


def save_peft_adapter(
    layers: dict[str, LoraLinear], spec: LoraSpec, base_model_path: str, out: Path
) -> None:
    """Write adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained does.

    The config is written here, not by PEFT's `LoraConfig`: importing PEFT imports transformers
    (4.6 s on 2 cores), which a worker that trains on the hand-written forward never needs. Its
    fields are a plain LoRA's, the rest left to PEFT's defaults when it loads the file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "inference_mode": True,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.contiguous() for k, v in adapter_state(layers).items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
