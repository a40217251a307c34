"""LoRA adapters through ``peft``: :func:`with_lora` adds them, :class:`AdaptersOff` is the adapted model with them
disabled (the frozen reference of DPO and PPO, without a second copy) and :func:`merged` folds them into a plain
``transformers`` model for the export."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from lit_rlhf.errors import ConfigError


def with_lora(model: PreTrainedModel, lora: dict | None, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """LoRA adapters (Hu et al. 2021) on ``model`` through ``peft`` when ``lora`` is given: its keys are
    ``peft.LoraConfig`` arguments (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``; by default every
    linear layer but the output one). Only the adapters train, and with ``task_type="SEQ_CLS"`` (a scalar-head
    model) the new head too. The weights under the adapters stay those loaded, which makes the model with its
    adapters disabled the reference (:class:`AdaptersOff`); options that train the biases or rewrite the weights at
    initialisation (PiSSA, LoftQ, …) are therefore refused."""
    if not lora:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ConfigError("LoRA needs the peft package: pip install 'lit-rlhf[peft]'") from error
    if lora.get("bias", "none") != "none" or lora.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise ConfigError("lora: bias must be 'none' and init_lora_weights true, false or 'gaussian', so that the "
                          "weights under the adapters stay the loaded ones")
    try:
        return get_peft_model(model, LoraConfig(**{"target_modules": "all-linear", "task_type": task_type, **lora}))
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
