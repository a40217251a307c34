"""Token positions: position ids that count only real tokens, the forward pass that uses them (so a row's outputs do
not depend on its padding), and the check that sequences fit a model's learned positions."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lit_rlhf.errors import ConfigError


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as a right-padded one."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def forward(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """Run a model with padding-independent position ids (``generate`` does the same internally), and without the
    key/value cache a model would otherwise build for generation that never comes (``use_cache=False``). ``kwargs``
    go to the model's forward."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )


def check_positions(model: torch.nn.Module, length: int, what: str) -> None:
    """Stop with one line when ``length`` tokens exceed a model's learned absolute positions (GPT-2, OPT), which
    would fail with an IndexError at the first long batch (a device assert on a GPU). Rotary models extrapolate,
    or are being stretched on purpose (``rope_scaling``), so they are left alone."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None)
    rotary = any(getattr(config, name, None) is not None for name in ("rope_theta", "rope_scaling", "rotary_dim"))
    if positions is not None and not rotary and length > positions:
        raise ConfigError(
            f"{what} of up to {length} tokens do not fit {config.name_or_path or 'the model'}, which has {positions} "
            "positions"
        )
