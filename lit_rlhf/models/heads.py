"""Scalar heads, read two ways: :func:`scalar_scores`, one score per sequence where its mask ends (the reward model;
:func:`shared_prompt_scores` for responses that share prompts), and :class:`ValueModel`, the head at every position
(PPO's critic)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from lit_rlhf.advantages import normalize_scores
from lit_rlhf.errors import ConfigError
from lit_rlhf.models.positions import forward
from lit_rlhf.models.shared_prompts import SharedPrompts, forward_sharing_prompts, select_rows


def _head_outputs(
    model: PreTrainedModel, run: Callable[[], object], second_head: torch.nn.Module | None = None
) -> list[torch.Tensor]:
    """The ``score`` head's output at every position ``[B, T]`` (float32) of each forward that ``run()`` makes; with
    a ``second_head``, which reads the same hidden states, both heads' ``[B, T, 2]``.

    The model's own forward reads its head at the last token that is not the pad id; where pad and EOS are one token
    (GPT-2, Llama: the loader's default) that skips the final EOS, and a finished answer would score as the same
    answer cut short. So the head's output at every position is caught on its way out, to be read where a mask ends.
    """
    outputs = []
    def catch(head: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        heads = output if second_head is None else torch.cat([output, second_head(inputs[0]).to(output.dtype)], -1)
        outputs.append(heads.squeeze(-1).float())

    hook = model.score.register_forward_hook(catch)
    try:
        run()
    finally:
        hook.remove()
    return outputs


def scalar_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    second_head: torch.nn.Module | None = None,
) -> torch.Tensor:
    """``[B]`` scores of a scalar-head model, read at each row's last attended position (left or right padding);
    with a ``second_head`` on the same hidden states, ``[B, 2]``."""
    (per_position,) = _head_outputs(model, lambda: forward(model, input_ids, attention_mask), second_head)
    last = (torch.arange(attention_mask.shape[1], device=attention_mask.device) * attention_mask).argmax(dim=1)
    return per_position[torch.arange(len(last), device=last.device), last]


def shared_prompt_scores(
    model: PreTrainedModel, shared: SharedPrompts, second_head: torch.nn.Module | None = None
) -> torch.Tensor:
    """``[R]`` scores of the responses of ``shared``, each prompt computed once
    (:func:`~lit_rlhf.models.shared_prompts.forward_sharing_prompts`): the head read at each response's last token,
    what :func:`scalar_scores` gives for the whole sequences up to float rounding; ``[R, 2]`` with a
    ``second_head``."""
    prompt_scores, response_scores = _head_outputs(model, lambda: forward_sharing_prompts(model, shared), second_head)
    # Column 0 is the prompt's last token, where a response of no tokens would be read.
    window = torch.cat([select_rows(prompt_scores[:, -1:], shared.prompt_of), response_scores], dim=1)
    return window[torch.arange(len(window), device=window.device), shared.response_mask.sum(dim=1)]


class ValueModel(torch.nn.Module):
    """Per-token values ``[B, T]``: a scalar-head model's backbone with its ``score`` head applied at every
    position (its own forward reads the head at the last token only), as ``(head − score_mean) / score_std``.

    A critic that starts as the reward model (InstructGPT) has targets built from scores normalised with the reward
    model's stored statistics; the fixed affine puts its first values on that scale too, instead of the raw score's.
    """

    def __init__(self, scalar_head_model: torch.nn.Module, score_mean: float = 0.0, score_std: float = 1.0) -> None:
        super().__init__()
        if not hasattr(scalar_head_model, "score"):
            raise ConfigError(f"{type(scalar_head_model).__name__} has no `score` head to serve as a value head")
        self.backbone, self.head = scalar_head_model.base_model, scalar_head_model.score
        self.score_mean, self.score_std = score_mean, score_std

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = forward(self.backbone, input_ids, attention_mask).last_hidden_state
        return normalize_scores(self.head(hidden).squeeze(-1).float(), self.score_mean, self.score_std)
