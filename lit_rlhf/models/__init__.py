"""Models, one module per job; every public name is importable from here (``from lit_rlhf.models import X``).

- :mod:`~lit_rlhf.models.loading`: tokenizers, causal LMs and scalar-head models from a name, a path or the world
  preset; the export; where models run outside a Trainer.
- :mod:`~lit_rlhf.models.positions`: padding-independent position ids, the forward pass that uses them, the check
  that sequences fit a model's positions.
- :mod:`~lit_rlhf.models.logprobs`: a model's per-token log-probs of given tokens.
- :mod:`~lit_rlhf.models.shared_prompts`: responses that share prompts, each prompt computed once.
- :mod:`~lit_rlhf.models.heads`: scalar heads, per sequence (reward model) and per token (PPO's critic).
- :mod:`~lit_rlhf.models.lora`: LoRA adapters, the adapters-off reference, the merged export.
- :mod:`~lit_rlhf.models.sharding`: FSDP2 sharding and gathering the whole weights.
- :mod:`~lit_rlhf.models.freezing`: trainable parameters, dropout off, frozen networks.
"""

from lit_rlhf.models.freezing import count_parameters, frozen, trainable, without_dropout
from lit_rlhf.models.heads import ValueModel, scalar_scores, shared_prompt_scores
from lit_rlhf.models.loading import (
    TOKENIZER_FILES,
    WORLD,
    WORLD_PRESET,
    export,
    inference_device,
    is_world,
    load_causal_lm,
    load_scalar_head_model,
    load_tokenizer,
    quiet_transformers,
    world_config,
)
from lit_rlhf.models.logprobs import model_token_logprobs, response_logits, shared_prompt_logprobs
from lit_rlhf.models.lora import AdaptersOff, LoRAConfig, merged, with_lora
from lit_rlhf.models.positions import check_positions, forward, position_ids_from_mask
from lit_rlhf.models.sharding import full_state_dict, is_sharded, shard
from lit_rlhf.models.shared_prompts import SharedPrompts, forward_sharing_prompts, select_rows, shares_prompts

__all__ = [
    "TOKENIZER_FILES",
    "WORLD",
    "WORLD_PRESET",
    "AdaptersOff",
    "LoRAConfig",
    "SharedPrompts",
    "ValueModel",
    "check_positions",
    "count_parameters",
    "export",
    "forward",
    "forward_sharing_prompts",
    "frozen",
    "full_state_dict",
    "inference_device",
    "is_sharded",
    "is_world",
    "load_causal_lm",
    "load_scalar_head_model",
    "load_tokenizer",
    "merged",
    "model_token_logprobs",
    "position_ids_from_mask",
    "quiet_transformers",
    "response_logits",
    "scalar_scores",
    "select_rows",
    "shard",
    "shared_prompt_logprobs",
    "shared_prompt_scores",
    "shares_prompts",
    "trainable",
    "with_lora",
    "without_dropout",
    "world_config",
]
