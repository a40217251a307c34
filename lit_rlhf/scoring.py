"""Scoring ``(prompt, response)`` texts: the one scoring function that PPO, judges and rejection sampling use.

:class:`RewardModelScorer` wraps an exported reward model; :class:`EnsembleScorer` several, combined (a folder with
``ensemble.json``, :func:`write_ensemble`); :class:`GoldScorer` is the embedded world's exact gold reward behind the
same interface (oracle runs, evaluation); :class:`FunctionScorer` a Python function. :func:`make_scorer` builds one
from a name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf.advantages import ENSEMBLE_RULES, combine_ensemble, normalize_scores
from lit_rlhf.data.collate import collate_demonstrations, encode_demonstrations
from lit_rlhf.data.formats import Demonstration
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import load_scalar_head_model, load_tokenizer, scalar_scores
from lit_rlhf.world import gold_reward, has_gold

SCORE_MEAN_KEY = "lit_rlhf_score_mean"
SCORE_STD_KEY = "lit_rlhf_score_std"
"""Config attributes where the reward phase stores the score statistics of its reference sample."""
LENGTH_KEYS = {"max_length": "lit_rlhf_max_length", "max_prompt_length": "lit_rlhf_max_prompt_length"}
"""Config attributes where the reward phase stores the length limits it was trained with: a scorer's defaults."""
LENGTH_SLOPE_KEY = "lit_rlhf_length_slope"
"""Config attribute of a length-corrected reward model (:mod:`lit_rlhf.reward_models`): the score per answer token
that its scorer subtracts."""


class Scorer(Protocol):
    def score(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """One score per response. ``finished`` marks the responses that ended (default all); a sample cut at
        ``max_new_tokens`` is not finished, and a scorer that reads EOS scores it without one."""
        ...


class GoldScorer:
    """The embedded world's gold reward (exact; available only on the world). It reads the text only: an unfinished
    answer loses what it lacks (its final ".", its missing items). Scores are float32 like every scorer's; with
    ``dtype=torch.float64`` they are :func:`lit_rlhf.world.gold_reward`'s values exactly."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        return torch.tensor([gold_reward(p, r) for p, r in zip(prompts, responses)], dtype=self.dtype)


class RewardModelScorer:
    """A scalar-head reward model scoring texts, each sequence tokenised as the reward phase trained on it
    (``prompt + response + EOS``; an unfinished response without the EOS, so a truncated answer is not read as a
    complete one); for a length-corrected export less its stored slope times the answer's length in tokens;
    optionally normalised with the statistics stored in the export."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 64,
        max_prompt_length: int = 32,
        batch_size: int = 64,
        normalize: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.normalize = normalize
        self.name_or_path = model.name_or_path
        """Where the reward model was loaded from: a critic that starts from it starts on its scale."""

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | None = None, **kwargs) -> RewardModelScorer:
        """Load an export, onto ``device`` if given (tools outside a Trainer pass :func:`inference_device`; in a
        phase the strategy places the model). Length limits default to those the reward model was trained with."""
        tokenizer = load_tokenizer(str(path))
        model = load_scalar_head_model(str(path), tokenizer, device=device).eval()
        trained = {name: getattr(model.config, key) for name, key in LENGTH_KEYS.items() if hasattr(model.config, key)}
        return cls(model, tokenizer, **{**trained, **kwargs})

    @property
    def networks(self) -> list[PreTrainedModel]:
        """The networks that score: a phase registers them, so that its strategy places them."""
        return [self.model]

    def response_lengths(self, responses: Sequence[str]) -> list[int]:
        """Each answer's length in this reward model's tokens."""
        return [len(ids) for ids in self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]]

    @property
    def statistics(self) -> tuple[float, float]:
        """``(mean, std)`` of the scores on the reward phase's reference sample; ``(0, 1)`` if none was stored."""
        config = self.model.config
        return getattr(config, SCORE_MEAN_KEY, 0.0), getattr(config, SCORE_STD_KEY, 1.0)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        finished = [True] * len(prompts) if finished is None else finished
        records = [Demonstration(prompt, response, ended=ended)
                   for prompt, response, ended in zip(prompts, responses, finished, strict=True)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start : start + self.batch_size]
            encoded = encode_demonstrations(chunk, self.tokenizer, self.max_length, self.max_prompt_length)
            batch = collate_demonstrations(encoded.examples, self.tokenizer.pad_token_id)
            scores.append(
                scalar_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
            )
        scores = torch.cat(scores) if scores else torch.zeros(0)
        if slope := getattr(self.model.config, LENGTH_SLOPE_KEY, 0.0):
            scores = scores - slope * torch.tensor(self.response_lengths(responses), dtype=scores.dtype)
        if self.normalize:
            scores = normalize_scores(scores, *self.statistics)
        return scores


ENSEMBLE_FILE = "ensemble.json"
"""In a folder, what makes it an ensemble of reward models: ``{"members": [paths], "rule", "uncertainty_penalty"}``,
member paths relative to the folder or absolute."""


class EnsembleScorer:
    """K reward models scoring the same texts, each score normalised with its own member's stored statistics (its
    scores of the same SFT samples have mean 0 and std 1), then combined by ``rule``
    (:func:`lit_rlhf.advantages.combine_ensemble`: ``mean``, ``worst_case``, ``uncertainty``). Its scores are on that
    normalised scale already, so :attr:`statistics` is ``(0, 1)``."""

    def __init__(self, members: list[RewardModelScorer], rule: str = "mean", uncertainty_penalty: float = 1.0) -> None:
        if not members:
            raise ConfigError("an ensemble needs at least one reward model")
        if rule not in ENSEMBLE_RULES:
            raise ConfigError(f"ensemble rule must be one of {', '.join(ENSEMBLE_RULES)}, got {rule!r}")
        for member in members:
            member.normalize = True
        self.members = members
        self.rule = rule
        self.uncertainty_penalty = uncertainty_penalty
        self.name_or_path = members[0].name_or_path

    @classmethod
    def from_folder(cls, path: str | Path, **member_options) -> EnsembleScorer:
        """The ensemble a folder's ``ensemble.json`` describes; ``member_options`` go to each member's
        :meth:`RewardModelScorer.from_pretrained` (``device``, length limits)."""
        description = json.loads((Path(path) / ENSEMBLE_FILE).read_text())
        member_options.pop("normalize", None)  # members are always normalised: their raw scales differ
        members = [RewardModelScorer.from_pretrained(Path(path) / member, **member_options)
                   for member in description["members"]]
        return cls(members, description["rule"], description.get("uncertainty_penalty", 1.0))

    @property
    def networks(self) -> list[PreTrainedModel]:
        return [member.model for member in self.members]

    @property
    def statistics(self) -> tuple[float, float]:
        return 0.0, 1.0

    def member_scores(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """``[K, B]``: each member's normalised scores."""
        return torch.stack([member.score(prompts, responses, finished) for member in self.members])

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        return combine_ensemble(self.member_scores(prompts, responses, finished), self.rule, self.uncertainty_penalty)


def write_ensemble(folder: str | Path, members: Sequence[str | Path], rule: str,
                   uncertainty_penalty: float = 1.0) -> Path:
    """Describe an ensemble of the reward-model exports ``members`` in ``folder``, which then loads wherever a
    reward model does (``make_scorer(folder)``); nothing is copied."""
    if rule not in ENSEMBLE_RULES:
        raise ConfigError(f"ensemble rule must be one of {', '.join(ENSEMBLE_RULES)}, got {rule!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    description = {"members": [str(Path(member).resolve()) for member in members], "rule": rule,
                   "uncertainty_penalty": uncertainty_penalty}
    (folder / ENSEMBLE_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return folder


GOLD = "gold"
"""The reward name that scores with the embedded world's gold reward (oracle runs)."""


class FunctionScorer:
    """A Python reward ``"package.module:function"`` taking ``(prompts, responses)`` and returning one score each.
    It sees texts only; PPO's ``reward.missing_eos_penalty`` is how an unfinished answer loses against it."""

    def __init__(self, spec: str) -> None:
        module_name, _, function_name = spec.partition(":")
        try:
            self.function = getattr(import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"reward {spec!r}: cannot import {function_name} from {module_name} ({error})") from error

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], finished: Sequence[bool] | None = None
    ) -> torch.Tensor:
        return torch.as_tensor(self.function(list(prompts), list(responses)), dtype=torch.float32)


def make_scorer(reward: str, **reward_model_options) -> Scorer:
    """The scorer a reward name means: ``"gold"``, ``"package.module:function"``, an ensemble's folder (with
    ``ensemble.json``) or a reward-model export path (built with ``reward_model_options``, e.g. ``normalize=True``
    or ``device``)."""
    if reward == GOLD:
        return GoldScorer()
    if ":" in reward and not Path(reward).exists():
        return FunctionScorer(reward)
    if (Path(reward) / ENSEMBLE_FILE).is_file():
        return EnsembleScorer.from_folder(reward, **reward_model_options)
    return RewardModelScorer.from_pretrained(reward, **reward_model_options)


def gold_scorer(prompts: Sequence[str]) -> Scorer | None:
    """The world's gold reward as a scorer when every prompt is a world prompt, else None: the one place that decides
    whether these prompts have a gold reward. Evaluation, PPO's rollouts, the reward model's ``gold/accuracy`` and
    collection's ``gold_agreement`` take the world through it, so the machinery never imports the world. Its scores
    are float64, :func:`lit_rlhf.world.gold_reward`'s values exactly (a caller wanting float32 casts)."""
    return GoldScorer(torch.float64) if has_gold(prompts) else None
