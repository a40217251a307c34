"""Loading and exporting models: tokenizers, causal LMs and scalar-head models from a name, a path or the world
preset, and the export the next phase loads.

Every phase names its starting model ``model_name_or_path``. A Hugging Face name or a local folder goes through
``from_pretrained`` (safetensors, ``trust_remote_code`` off unless asked); the special value ``"world"``
(:data:`WORLD`) builds the small GPT-2 preset for the embedded world with ``from_config``. Phases export with
:func:`export` so the next phase loads the result by path. Outside a Trainer, models run on
:func:`inference_device`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import ACT2FN, FastGELUActivation, NewGELUActivation
from transformers.utils import logging as transformers_logging

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
            raise ConfigError(f"cannot load a tokenizer from {name_or_path}: {_first_line(error)}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {name_or_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def world_config(tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    """The world preset: a small GPT-2 without dropout (RLHF log-prob ratios must not be noisy). Its activation is
    GPT-2's tanh GELU as torch's one fused op (``gelu_pytorch_tanh``), not transformers' ``gelu_new``, the same formula
    in eight elementwise ops: a fifth of a training step of a model this small."""
    return GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_pytorch_tanh",
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
    return _with_fused_tanh_gelu(model)


def _with_fused_tanh_gelu(model: PreTrainedModel) -> PreTrainedModel:
    """Swap transformers' ``gelu_new`` and ``gelu_fast`` (GPT-2, GPT-J, GPT-Neo, Phi-2) for ``gelu_pytorch_tanh``.

    All three are the tanh approximation of GELU (Hendrycks & Gimpel 2016), but the first two spell it as eight
    elementwise ops, each a pass over the MLP's activations forward and again backward; torch's
    ``gelu(approximate="tanh")`` is one fused op. In float32 they differ by at most 5e-7, and both lie within 5e-7 of
    the formula in float64 (in bfloat16 by up to one bf16 step, the fused op the closer). A training step of the
    benchmark's 10M GPT-2 runs 1.09–1.25× faster. Only the modules change: the config keeps its activation, so an
    export loads as it did.
    """
    slow = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in (NewGELUActivation, FastGELUActivation)
    ]
    for parent, name in slow:
        setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
    return model


def _first_line(error: BaseException) -> str:
    """The first line of a library's error, so the CLI's message stays one line (hub errors run to several)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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
    """A model with a scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``; read it with
    :func:`lit_rlhf.models.scalar_scores`): the reward model, initialised from an SFT export whose LM head it drops;
    on ``device`` if given."""
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
    ``state_dict`` gives the weights of a sharded model, gathered
    (see :func:`lit_rlhf.models.sharding.full_state_dict`)."""
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
