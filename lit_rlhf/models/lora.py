"""LoRA adapters through ``peft``: :func:`with_lora` adds them, :class:`AdaptersOff` is the adapted model with them
disabled (the frozen reference of DPO and PPO, without a second copy) and :func:`merged` folds them into a plain
``transformers`` model for the export."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from lit_rlhf.errors import ConfigError


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (Hu et al. 2021), one group in every phase (``--model.lora.r 16``); the names are
    ``peft.LoraConfig``'s. Only these options: the others would train the biases or rewrite the weights under the
    adapters (PiSSA, LoftQ), and the model with its adapters disabled must stay the loaded one, the reference.

    Args:
        r: the adapters' rank
        lora_alpha: their scale is lora_alpha / r (with use_rslora, lora_alpha / sqrt(r))
        lora_dropout: dropout on the adapters' input; DPO and PPO switch it off, as all dropout
        target_modules: the layers that get adapters: "all-linear" (every linear layer but the output one), or names
        use_rslora: rank-stabilised scaling (Kalajdzievski 2023)
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False


def with_lora(model: PreTrainedModel, lora: LoRAConfig | None, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """LoRA adapters on ``model`` through ``peft`` when ``lora`` is given. Only the adapters train, and with
    ``task_type="SEQ_CLS"`` (a scalar-head model) the new head too. The weights under the adapters stay those
    loaded, which makes the model with its adapters disabled the reference (:class:`AdaptersOff`)."""
    if lora is None:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("LoRA needs the peft package: pip install 'lit-rlhf[peft]'") from error
    try:
        return get_peft_model(model, LoraConfig(**asdict(lora), task_type=task_type))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"lora: {error}") from None


class AdaptersOff(torch.nn.Module):
    """A LoRA-adapted model seen with its adapters disabled: the weights it was loaded with, so the frozen reference
    of DPO and PPO needs no second copy of the model. The adapted model is held, not registered: its parameters are
    the policy's, trained, placed and checkpointed there."""

    def __init__(self, adapted: PreTrainedModel) -> None:
        super().__init__()
        self.__dict__["adapted"] = adapted

    @property
    def device(self) -> torch.device:
        return self.adapted.device

    @property
    def config(self):
        return self.adapted.config

    @contextmanager
    def _as_reference(self):
        """The adapted model in eval mode with its adapters disabled, restored afterwards."""
        was_training = self.adapted.training
        self.adapted.eval()
        try:
            with self.adapted.disable_adapter():
                yield self.adapted
        finally:
            self.adapted.train(was_training)

    def forward(self, *args, **kwargs):
        with self._as_reference() as model:
            return model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._as_reference() as model:
            return model.generate(*args, **kwargs)


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """A LoRA-adapted model as a plain ``transformers`` model with the adapters merged into a copy of the weights
    (the adapted model stays as it is, to train or validate on); any other model as it is."""
    return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
