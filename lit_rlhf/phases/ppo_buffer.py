"""PPO's experience: one iteration's :class:`Rollout` and the :class:`RolloutBuffer` that serves it as shuffled
minibatches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch


@dataclass
class Rollout:
    """One batch of PPO experience.

    ``input_ids``, ``attention_mask`` and ``response_mask`` are ``[B, T]`` over input positions (prompt
    left-padded, response right-padded), ready for a forward pass. The other tensors are ``[B, T-1]``, aligned with
    :func:`lit_rlhf.models.model_token_logprobs`: column t is about the token at input position t+1, and ``mask`` is 1
    on response tokens. ``values`` and ``returns`` are ``None`` for critic-free estimators.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    """Log-probs under the policy that sampled the responses (PPO's π_old)."""
    advantages: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (indices into the batch)."""
        return Rollout(**{f.name: None if (v := getattr(self, f.name)) is None else v[rows] for f in fields(self)})


class RolloutBuffer:
    """The experience of one PPO iteration, served for several passes as shuffled minibatches.

    Each minibatch is one optimiser step, split into ``gradient_accumulation_steps`` micro-batches whose gradients
    add up (so a large minibatch fits in memory), each micro-batch's token-mean losses weighted by its
    :func:`token_shares`.
    """

    def __init__(self, rollout: Rollout, num_minibatches: int, gradient_accumulation_steps: int) -> None:
        if len(rollout) < num_minibatches * gradient_accumulation_steps:
            raise ValueError(
                f"a rollout of {len(rollout)} samples cannot be split into {num_minibatches} minibatches of "
                f"{gradient_accumulation_steps} micro-batches"
            )
        self.rollout = rollout
        self.num_minibatches = num_minibatches
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def __len__(self) -> int:
        return len(self.rollout)

    def minibatches(self) -> Iterator[list[Rollout]]:
        """One pass: a fresh shuffle (global RNG) cut into minibatches, each a list of micro-batches."""
        order = torch.randperm(len(self.rollout))
        for minibatch in order.tensor_split(self.num_minibatches):
            yield [self.rollout.select(rows) for rows in minibatch.tensor_split(self.gradient_accumulation_steps)]


def token_shares(micro_batches: list[Rollout]) -> list[torch.Tensor]:
    """Each micro-batch's share of its minibatch's response tokens: the weight of its token-mean losses, so that they
    add up to the minibatch's own token mean, the loss of one forward over the whole minibatch, however the tokens
    fall between micro-batches (equal weights would count a token of a short micro-batch more)."""
    tokens = torch.stack([micro_batch.mask.sum() for micro_batch in micro_batches]).float()
    return list(tokens / tokens.sum().clamp(min=1))
