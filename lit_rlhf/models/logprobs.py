"""A model's per-token log-probs of given tokens (:func:`model_token_logprobs`): one of four log-prob functions,
each named for the level it works at.

- :func:`lit_rlhf.losses.token_logprobs`: logits and labels → per-token log-probs;
- :func:`model_token_logprobs`: a model and token ids → per-token log-probs (the first, on the model's logits);
- :func:`lit_rlhf.losses.sequence_logprobs`: per-token log-probs and a mask → one log-prob per sequence;
- :func:`lit_rlhf.phases.dpo_logprobs.model_sequence_logprobs`: a model and DPO's sequences → one log-prob per
  sequence (the second, then the third).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lit_rlhf import losses
from lit_rlhf.models.positions import forward


def model_token_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Per-token log-probs of the given tokens under a causal LM, aligned for next-token prediction.

    Returns ``(logps, mask)`` of shape ``[B, T-1]``: ``logps[:, t]`` is log π(input_ids[:, t+1] | prefix) and
    ``mask`` is ``response_mask[:, 1:]``. Sampling ``temperature`` divides the logits, so PPO's ratios refer to
    the distribution the rollouts were drawn from. With ``return_entropy`` the per-position entropy of the whole
    next-token distribution comes third, from the same forward; without ``entropy_grad`` it is only measured (no
    autograd graph through the full-vocabulary float32 softmax: PPO logs it but has no entropy bonus). The values
    are :func:`lit_rlhf.losses.token_logprobs` of the shifted logits; :func:`lit_rlhf.losses.sequence_logprobs`
    reduces them to one per sequence. Every phase's log-probs come from here.
    """
    logits = forward(model, input_ids, attention_mask).logits
    if temperature != 1.0:
        logits = logits / temperature
    logits, labels, mask = losses.shift_for_next_token(logits, input_ids, response_mask)
    logps = losses.token_logprobs(logits, labels)
    if return_entropy:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            return logps, mask, losses.entropy_from_logits(logits if entropy_grad else logits.detach())
    return logps, mask
