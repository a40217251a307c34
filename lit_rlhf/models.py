"""The one model loader: tokenizers, causal LMs and scalar-head models from a name, a path or the world preset.

Every phase names its starting model ``model_name_or_path``. A Hugging Face name or a local folder goes through
``from_pretrained`` (safetensors, ``trust_remote_code`` off unless asked); the special value ``"world"``
(:data:`WORLD`) builds the small GPT-2 preset for the embedded world with ``from_config``. Phases export with
:func:`export` so the next phase loads the result by path. Also here: the per-token value head PPO's critic uses
(:class:`ValueModel`), FSDP2 sharding (:func:`shard`, :func:`full_state_dict`) and where models run outside a
Trainer (:func:`inference_device`).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from lit_rlhf import losses
from lit_rlhf.errors import ConfigError

WORLD = "world"
"""The value of ``model_name_or_path`` / ``tokenizer_name_or_path`` that selects the embedded world preset."""

WORLD_PRESET = {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 128}
"""Size of the world's GPT-2 (~0.4M parameters): it learns the world in well under a minute on two CPU cores."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
"""A local folder holds a tokenizer when it has one of these (fast, configured, BPE or SentencePiece)."""


def is_world(name_or_path: str) -> bool:
    return name_or_path == WORLD


def _check_exists(name_or_path: str) -> None:
    """Fail with one line when a name that can only be a local path does not exist (instead of a hub traceback).

    Anything that is not a valid hub id (``org/name``) is a path, and so is a name whose first part is a folder
    here (``runs/sft/hf`` before SFT has run, or ``runs/hf``).
    """
    path = Path(name_or_path).expanduser()
    try:
        validate_repo_id(name_or_path)
        is_hub_id = not (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    except HFValidationError:
        is_hub_id = False
    if not is_hub_id and not path.exists():
        raise ConfigError(f"model not found: {name_or_path} (no such folder)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer, give it a pad token if it has none (the EOS token), and pad on the right."""
    if is_world(name_or_path):
        from lit_rlhf.world import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        _check_exists(name_or_path)
        folder = Path(name_or_path).expanduser()
        if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
            raise ConfigError(f"no tokenizer in {name_or_path} (none of {', '.join(TOKENIZER_FILES)})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load a tokenizer from {name_or_path}: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {name_or_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def world_config(tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    """The world preset: a small GPT-2 without dropout (RLHF log-prob ratios must not be noisy)."""
    return GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **WORLD_PRESET,
    )


def _align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for a load or an export: it reports every head a load drops or
    adds (a LOAD REPORT table), which is expected here, where a reward model starts from a causal LM and the reverse,
    and draws a bar for each file it reads or writes. Its errors still show, and a load that fails still raises."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _from_pretrained(
    auto_class, name_or_path: str, trust_remote_code: bool, dtype: str | None, new_head: bool = False, **kwargs
):
    """``auto_class.from_pretrained`` with one-line errors. Weights the checkpoint lacks start untrained: expected
    for the head of a model built with ``new_head`` (what lies outside its base model), and named in a warning
    anywhere else, since transformers' own report is silenced (:func:`quiet_transformers`)."""
    _check_exists(name_or_path)
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        with quiet_transformers():
            model, loading = auto_class.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load a model from {name_or_path}: {_first_line(error)}") from error
    base = f"{model.base_model_prefix}."
    untrained = sorted(key for key in loading["missing_keys"] if not new_head or key.startswith(base))
    if untrained:
        warnings.warn(
            f"{name_or_path} lacks {len(untrained)} weights of {type(model).__name__}, which start untrained: "
            f"{', '.join(untrained[:3])}{', ...' if len(untrained) > 3 else ''}",
            stacklevel=3,
        )
    return model


def _first_line(error: BaseException) -> str:
    """The first line of a library's error, so the CLI's message stays one line (hub errors run to several)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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


def inference_device() -> torch.device:
    """Where models run outside a Trainer (collection, judges, best-of-n, the pipeline's evaluation): the GPU when
    there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_causal_lm(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
    dtype: str | None = None,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """A causal LM from a name or path, or the world preset freshly initialised (seed it first); on ``device`` if
    given (in a phase the strategy places it)."""
    if is_world(name_or_path):
        model = AutoModelForCausalLM.from_config(world_config(tokenizer))
    else:
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, trust_remote_code, dtype)
    model = _align_special_tokens(model, tokenizer)
    return model if device is None else model.to(device)


def load_scalar_head_model(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    trust_remote_code: bool = False,
    dtype: str | None = None,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """A model with a scalar head read at the last non-pad token (``AutoModelForSequenceClassification``,
    ``num_labels=1``): the reward model, initialised from an SFT export whose LM head it drops; on ``device`` if
    given."""
    if is_world(name_or_path):
        config = world_config(tokenizer)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        _check_exists(name_or_path)
        try:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load a model from {name_or_path}: {_first_line(error)}") from error
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        model = _from_pretrained(
            AutoModelForSequenceClassification, name_or_path, trust_remote_code, dtype, new_head=True, config=config
        )
    model = _align_special_tokens(model, tokenizer)
    return model if device is None else model.to(device)


def export(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, state_dict: dict | None = None
) -> Path:
    """Write model and tokenizer with ``save_pretrained`` (safetensors) so the next phase loads them by path;
    ``state_dict`` gives the weights of a sharded model, gathered (see :func:`full_state_dict`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pad_token_id = model.config.pad_token_id
    if hasattr(model, "score") and tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Without a pad id, transformers reads a scalar head at the last token of one unpadded sequence, the final
        # EOS, as scalar_scores does; with pad = EOS it would skip the EOS (and a batch > 1 now fails loudly).
        model.config.pad_token_id = None
    try:
        model.save_pretrained(out_dir, state_dict=state_dict)
    finally:
        model.config.pad_token_id = pad_token_id
    tokenizer.save_pretrained(out_dir)
    return out_dir


def shard(module: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 (``fully_shard``) over the device ``mesh``: every transformer block on its own (the classes the Hugging
    Face models inside name in ``_no_split_modules``), then the rest with ``module`` as the root, so that calling
    ``module`` gathers what its forward needs, one block at a time."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    block_names = {
        name for sub in module.modules() if isinstance(sub, PreTrainedModel) for name in sub._no_split_modules or ()
    }
    for block in [sub for sub in module.modules() if type(sub).__name__ in block_names]:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded ``module`` on the CPU of rank 0 (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as a right-padded one."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def forward(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run a model with padding-independent position ids (``generate`` does the same internally)."""
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    )


def response_logprobs(
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
    autograd graph through the full-vocabulary float32 softmax: PPO logs it but has no entropy bonus). Every
    phase's log-probs come from here.
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


def scalar_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` scores of a scalar-head model, read at each row's last attended position (left or right padding).

    The model's own forward reads its head at the last token that is not the pad id; where pad and EOS are one token
    (GPT-2, Llama: the loader's default) that skips the final EOS, and a finished answer would score as the same
    answer cut short. So the head's output at every position is caught on its way out and read where the mask ends.
    """
    per_position = []
    hook = model.score.register_forward_hook(lambda head, inputs, output: per_position.append(output))
    try:
        forward(model, input_ids, attention_mask)
    finally:
        hook.remove()
    last = (torch.arange(attention_mask.shape[1], device=attention_mask.device) * attention_mask).argmax(dim=1)
    return per_position[0].squeeze(-1).float()[torch.arange(len(last), device=last.device), last]


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
        return (self.head(hidden).squeeze(-1).float() - self.score_mean) / self.score_std


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


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimiser should hold (with LoRA, the adapters only)."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere: RLHF's probability ratios (PPO's π/π_old, DPO's π/π_ref) must not be noisy, and
    exactly 1 before the first update (TRL does the same). Besides ``nn.Dropout`` that is the attention dropout
    that Llama, Qwen, Mistral and Phi keep as a float on each attention module (read from
    ``config.attention_dropout``, applied in train mode); the config says so too, for the export."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0
    return model


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A network that is only evaluated: no dropout, eval mode, no gradients."""
    return without_dropout(model).eval().requires_grad_(False)
