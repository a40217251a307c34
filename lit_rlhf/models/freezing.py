"""Which parameters train and which networks are only evaluated: :func:`trainable` (what an optimiser holds),
:func:`without_dropout` (noise-free probability ratios), :func:`frozen` (evaluated only) and
:func:`count_parameters`."""

from __future__ import annotations

import torch


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimiser should hold (with LoRA, the adapters only)."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere: RLHF's probability ratios (PPO's π/π_old, DPO's π/π_ref) must not be noisy, and
    exactly 1 before the first update (TRL does the same). Besides ``nn.Dropout`` that is the attention dropout
    that Llama, Qwen, Mistral and Phi keep as a float on each attention module (read from
    ``config.attention_dropout``, applied in train mode); the config says so too, for the export."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0
    return model


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A network that is only evaluated: no dropout, eval mode, no gradients."""
    return without_dropout(model).eval().requires_grad_(False)
