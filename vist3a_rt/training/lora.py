"""Trainable LoRA for the reconstruction network, saved in the official checkpoint naming.

``add_lora`` wraps every targeted ``nn.Linear`` / ``nn.Conv2d`` (the official rule: name
contains a target string; no targets = all) in a module that keeps the frozen base weight
and adds ``scaling · B @ A``. Factor shapes and key names are the official ones
(``<name>.lora_A``, ``<name>.lora_B``; Conv2d A (r·k, in·k), B (out·k, r·k)), so
``lora_state_dict`` writes exactly what ``vist3a_rt.load_stitched_decoder`` reads back
(and merges). A is Kaiming-uniform, B zero: training starts from the base network.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.lora import LoraSpec


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, spec: LoraSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach())
        self.lora_A = nn.Parameter(base.weight.new_empty(spec.r, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, spec.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


class LoRAConv2d(nn.Module):
    """LoRA on a square-kernel Conv2d; the (out·k, in·k) product is read row-major as the kernel."""

    def __init__(self, base: nn.Conv2d, spec: LoraSpec) -> None:
        super().__init__()
        k = base.kernel_size[0]
        if base.kernel_size[0] != base.kernel_size[1]:
            raise ValueError(f"LoRA needs a square conv kernel, got {base.kernel_size}")
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach())
        self.lora_A = nn.Parameter(base.weight.new_empty(spec.r * k, base.in_channels // base.groups * k))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_channels * k, spec.r * k))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = spec.scaling
        self.conv_args = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        self.padding_mode = base.padding_mode
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRA on a conv with padding_mode {base.padding_mode!r} is not supported")

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.merged_weight(), self.bias, **self.conv_args)

    def merged_weight(self) -> Tensor:
        return self.weight + (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling


def add_lora(model: nn.Module, spec: LoraSpec, prefix: str = "encoder.") -> list[str]:
    """Wrap the targeted layers under ``prefix`` in place; returns the wrapped module names.
    Everything else is frozen; LoRA factors and the wrapped layers' biases train (the official
    "lora_only" bias mode)."""
    targets = [(name, module) for name, module in model.named_modules()
               if name.startswith(prefix) and isinstance(module, (nn.Linear, nn.Conv2d)) and spec.targets(name)]
    model.requires_grad_(False)
    for name, module in targets:
        wrapper = LoRALinear(module, spec) if isinstance(module, nn.Linear) else LoRAConv2d(module, spec)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
    return [name for name, _ in targets]


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The official ``lora`` entry: A, B and the bias of every LoRA layer."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A"] = module.lora_A.detach().clone()
        state[f"{name}.lora_B"] = module.lora_B.detach().clone()
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().clone()
    return state


def merge_lora_layers(model: nn.Module) -> None:
    """Replace every LoRA wrapper by a plain layer with the merged weight (for inference/export)."""
    for name, module in lora_modules(model).items():
        weight = module.merged_weight().detach()
        if isinstance(module, LoRALinear):
            plain = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
        else:
            plain = nn.Conv2d(weight.shape[1] * module.conv_args["groups"], weight.shape[0], weight.shape[2:],
                              bias=module.bias is not None, device="meta", **module.conv_args)
        plain.weight = nn.Parameter(weight)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
