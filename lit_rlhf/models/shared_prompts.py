"""Responses that share prompts, run with each prompt computed once: the prompts go through the model into a
key/value cache, and every response goes through after its own prompt's cached keys and values. A comparison's
chosen and rejected answers (and a prompt's k sampled answers) share one prompt, so its tokens, about a fifth of a
preference batch, are computed once instead of once per response. Gradients flow through the cache into the prompt
pass, so training is the same as on whole sequences, up to float rounding."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from lit_rlhf.errors import ConfigError
from lit_rlhf.models.positions import position_ids_from_mask


@dataclass
class SharedPrompts:
    """Distinct prompts and the responses that follow them: ``prompt_ids`` / ``prompt_mask`` ``[P, Tp]``
    left-padded (every prompt ends at the last column), ``response_ids`` / ``response_mask`` ``[R, Tr]``
    right-padded, and ``prompt_of`` ``[R]``, the row of the prompt each response follows."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_of: torch.Tensor


class _SelectRows(torch.autograd.Function):
    """``tensor[rows]``, whose backward sums a repeated row's gradients as a product with one-hot rows: in a fixed
    order. Indexing's own backward accumulates repeats in whatever order the threads run (on the CPU as on a GPU),
    so that two runs of one training job would part in the last bits."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.table_rows = len(tensor)
        return tensor.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rows,) = ctx.saved_tensors
        one_hot = torch.nn.functional.one_hot(rows, ctx.table_rows).to(grad.dtype)
        with torch.autocast(grad.device.type, enabled=False):  # in the gradient's own precision, not bf16
            summed = one_hot.T @ grad.reshape(len(rows), -1)
        return summed.view(ctx.table_rows, *grad.shape[1:]), None


def select_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``tensor[rows]``: the same values in the same dtype (under autocast too), with a deterministic backward
    (:class:`_SelectRows`)."""
    return _SelectRows.apply(tensor, rows)


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The keyword under which the Hugging Face model inside ``model`` (under a PEFT or the package's wrapper)
    takes a key/value cache: ``cache`` since transformers 5 renamed it, ``past_key_values`` before; None for a
    model that takes none (a state-space model keeps a state, not keys and values)."""
    model = getattr(model, "adapted", model)  # AdaptersOff holds the LoRA model without registering it
    inner = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    parameters = inspect.signature(inner.forward).parameters if inner is not None else {}
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def shares_prompts(model: torch.nn.Module) -> bool:
    """Whether :func:`forward_sharing_prompts` can run ``model``: it takes a key/value cache."""
    return _cache_argument(model) is not None


def forward_sharing_prompts(model: torch.nn.Module, shared: SharedPrompts, **prompt_kwargs) -> tuple:
    """The model's outputs ``(on the prompts, on the responses)``: the prompts' forward fills a key/value cache,
    whose rows are then repeated for each response (``prompt_of``, :func:`select_rows`), and the responses' forward
    attends to them. Positions count only real tokens, so each response sees the positions it has in its whole
    sequence. ``prompt_kwargs`` go to the prompts' forward only (``logits_to_keep=1``: a causal LM needs only the
    logits that predict each response's first token)."""
    argument = _cache_argument(model)
    if argument is None:
        raise ConfigError(f"{type(model).__name__} takes no key/value cache, so prompts cannot be shared: "
                          "set share_prompts: false")
    cache = DynamicCache()
    prompt_outputs = model(
        input_ids=shared.prompt_ids,
        attention_mask=shared.prompt_mask,
        position_ids=position_ids_from_mask(shared.prompt_mask),
        use_cache=True,
        **{argument: cache},
        **prompt_kwargs,
    )
    if cache.get_seq_length() != shared.prompt_ids.shape[1]:
        raise ConfigError(
            f"{type(model).__name__} did not fill the key/value cache it was given, so prompts cannot be shared: "
            "set share_prompts: false"
        )
    for layer in cache.layers:
        layer.keys = select_rows(layer.keys, shared.prompt_of)
        layer.values = select_rows(layer.values, shared.prompt_of)
    prompt_lengths = shared.prompt_mask.sum(dim=1)[shared.prompt_of]
    response_columns = torch.arange(shared.response_ids.shape[1], device=shared.response_ids.device)
    response_outputs = model(
        input_ids=shared.response_ids,
        attention_mask=torch.cat([shared.prompt_mask[shared.prompt_of], shared.response_mask], dim=1),
        position_ids=prompt_lengths.unsqueeze(1) + response_columns,
        use_cache=True,
        **{argument: cache},
    )
    return prompt_outputs, response_outputs
