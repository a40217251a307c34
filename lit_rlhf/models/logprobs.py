"""A model's per-token log-probs of given tokens (:func:`model_token_logprobs`): one of four log-prob functions,
each named for the level it works at.

- :func:`lit_rlhf.losses.token_logprobs`: logits and labels → per-token log-probs;
- :func:`model_token_logprobs`: a model and token ids → per-token log-probs (the first, on the model's logits);
  :func:`shared_prompt_logprobs` the same for responses that share prompts, each prompt computed once;
- :func:`lit_rlhf.losses.sequence_logprobs`: per-token log-probs and a mask → one log-prob per sequence;
- :func:`lit_rlhf.phases.dpo_logprobs.model_sequence_logprobs`: a model and DPO's sequences → one log-prob per
  sequence (the second, then the third).
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel

from lit_rlhf import losses
from lit_rlhf.models.positions import forward
from lit_rlhf.models.shared_prompts import SharedPrompts, forward_sharing_prompts, select_rows


def response_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A causal LM's logits only from the position before the batch's first response token on, with ``input_ids``
    and ``response_mask`` cut to the same columns: ``(logits, input_ids, response_mask, start)``, the window
    starting at column ``start``. A loss on the response tokens needs no more, and the LM head and its softmax over
    the prompts (much of a step's work where the vocabulary is large) are skipped: the model is asked for its last
    logits only (``logits_to_keep``, what transformers' causal LMs take), and a model that returns them all anyway
    is cut here. The window holds whole rows' responses, so every loss on it is the loss on the full sequences."""
    responses = response_mask.any(dim=0).nonzero()
    start = max(int(responses[0]) - 1, 0) if len(responses) else 0
    kept = input_ids.shape[1] - start
    keep = {"logits_to_keep": kept} if start and _takes_logits_to_keep(model) else {}
    logits = forward(model, input_ids, attention_mask, **keep).logits[:, -kept:]
    return logits, input_ids[:, start:], response_mask[:, start:], start


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether a model's forward accepts ``logits_to_keep`` by name or passes keyword arguments on (PEFT's and the
    package's own wrappers do, to a causal LM that takes it)."""
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.name == "logits_to_keep" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


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
    reduces them to one per sequence. Every phase's log-probs come from here. Only the response window's logits
    are computed (:func:`response_logits`); the columns before it, all prompt, hold 0.
    """
    logits, window_ids, window_mask, start = response_logits(model, input_ids, attention_mask, response_mask)
    if temperature != 1.0:
        logits = logits / temperature
    logits, labels, _ = losses.shift_for_next_token(logits, window_ids, window_mask)
    before_window = (start, 0)  # pads the last dimension's left side: the prompt columns the window skipped
    logps = torch.nn.functional.pad(losses.token_logprobs(logits, labels), before_window)
    mask = response_mask[:, 1:]
    if return_entropy:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            entropy = losses.entropy_from_logits(logits if entropy_grad else logits.detach())
            return logps, mask, torch.nn.functional.pad(entropy, before_window)
    return logps, mask


def shared_prompt_logprobs(model: PreTrainedModel, shared: SharedPrompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``[R, Tr]`` of the response tokens of ``shared`` under a causal LM, each prompt computed
    once (:func:`~lit_rlhf.models.shared_prompts.forward_sharing_prompts`), and the mask of real tokens: what
    :func:`model_token_logprobs` gives for the response columns of the whole sequences, up to float rounding. A
    response's first token is scored by its prompt's last logits, the others by the response's own."""
    keep_last = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    prompt_outputs, response_outputs = forward_sharing_prompts(model, shared, **keep_last)
    first_logits = select_rows(prompt_outputs.logits[:, -1:], shared.prompt_of)
    first = losses.token_logprobs(first_logits, shared.response_ids[:, :1])
    rest = losses.token_logprobs(response_outputs.logits[:, :-1], shared.response_ids[:, 1:])
    return torch.cat([first, rest], dim=1), shared.response_mask
