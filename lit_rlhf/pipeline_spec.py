"""A pipeline file (``configs/pipeline.yaml``) as typed specs: every key a field, its default in one place.

Each stage kind is a frozen dataclass — :class:`FitStage`, :class:`CollectStage`, :class:`RejectionSampleStage`,
:class:`SelfPlayStage`, :class:`BestOfNStage`, :class:`OptimumStage` — and so are the shorthands that expand into
rounds of them (:class:`RejectionSamplingRounds`, :class:`SpinRounds`, :class:`IterativeRounds`), the file's
``evaluation`` (:class:`EvaluationSpec`) and the file itself (:class:`PipelineSpec`). :func:`load_pipeline` builds
them from the YAML, refusing an unknown key, a missing one or a value of the wrong type in one line that names the
file, the stage and the key. docs/pipeline.md lists every field with its default (a test keeps the two in step). A
field's docstring, the string under it, is also the help of the command-line option made from it (``lit-rlhf
collect``'s are :class:`CollectStage`'s fields), whose values :func:`build_spec_from_text` checks as a file's.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
import types
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from lit_rlhf.data.formats import normalize_rows
from lit_rlhf.data.sources import is_local, read_rows
from lit_rlhf.errors import ConfigError, DataError
from lit_rlhf.judges import JUDGES

Spec = TypeVar("Spec")
RESERVED_NAME = "init"
"""The summary's row of the untrained model: no stage may take its name."""


# --- stages --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """What every stage has: a unique ``name``, its folder ``OUT/<name>/``; the class's ``kind`` picks it."""

    kind: ClassVar[str]
    AT_LEAST: ClassVar[dict[str, float]] = {}
    """Lower bounds of the class's own number settings (its bases add theirs): checked when a file is read."""
    name: str

    def as_record(self) -> dict[str, Any]:
        """The stage as ``done.json`` keeps it: every setting, defaults included, so that a stage whose settings
        changed, in the file or in a default, runs again."""
        return {"kind": self.kind, **asdict(self)}

    def reads(self) -> set[str]:
        """Every text setting but the name, alone or in a list: the earlier stages (and the paths) this stage
        reads."""
        texts = set()
        for spec_field in fields(self):
            value = getattr(self, spec_field.name)
            if spec_field.name != "name" and isinstance(value, str | list):
                texts |= {value} if isinstance(value, str) else {item for item in value if isinstance(item, str)}
        return texts


@dataclass(frozen=True, kw_only=True)
class FitStage(StageSpec):
    """A Lightning phase from a phase config, its inputs naming earlier stages (their output) or paths."""

    kind: ClassVar[str] = "fit"
    config: str
    model: str | None = None
    reward_model: str | None = None
    statistics_policy: str | None = None
    data: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SamplingStage(StageSpec):
    """A stage that samples answers of ``policy``: its decoding settings and prompt length limit."""

    AT_LEAST: ClassVar[dict[str, float]] = {"max_new_tokens": 1, "temperature": 0, "max_prompt_length": 1}
    policy: str
    """The model that answers."""
    max_new_tokens: int = 24
    """Answer length limit, in tokens."""
    temperature: float = 1.0
    """Sampling temperature; ``0`` decodes greedily."""
    max_prompt_length: int = 32
    """Prompts are cut from the left to this many tokens."""
    on_bad_row: Literal["error", "skip"] | None = None
    """What a bad row of the prompts (or demonstrations) it reads does: ``error`` stops the run naming it, ``skip``
    leaves it out, counted; ``None``: the pipeline file's ``on_bad_row``."""


@dataclass(frozen=True, kw_only=True)
class CollectStage(SamplingStage):
    """k answers per training prompt, ranked by a judge, written as C(k,2) comparisons."""

    kind: ClassVar[str] = "collect"
    AT_LEAST: ClassVar[dict[str, float]] = {"k": 2, "num_prompts": 1}
    k: int = 4
    """Answers per prompt; a ranking of k gives C(k, 2) pairs."""
    num_prompts: int = 2000
    """How many training prompts: rows, drawn at random with the seed where there are more."""
    prompts: str | None = None
    """Training prompts, any file or dataset with a prompt column; ``None``: the pipeline file's ``prompts``, else
    the world's."""
    judge: Literal[JUDGES] | None = None
    """Who ranks the answers; ``raters`` (the world's simulated raters) and ``gold`` know only the world's prompts.
    ``None``: ``raters``, on the world's prompts."""
    judge_model: str | None = None
    """The reward-model export of ``judge: reward_model``, or the causal LM of ``judge: llm``."""
    reward: str | None = None
    """The reward function ``package.module:function`` of ``judge: function``, as PPO takes."""
    principles: str | None = None
    """A text file of the LLM judge's written principles; ``None``: built in."""


@dataclass(frozen=True, kw_only=True)
class RejectionSampleStage(SamplingStage):
    """n answers per training prompt, the best ``keep`` by ``reward_model`` written as demonstrations."""

    kind: ClassVar[str] = "rejection_sample"
    AT_LEAST: ClassVar[dict[str, float]] = {"n": 1, "keep": 1, "num_prompts": 1}
    reward_model: str
    n: int = 8
    keep: int = 1
    threshold: float | None = None
    num_prompts: int = 1000
    prompts: str | None = None


@dataclass(frozen=True, kw_only=True)
class SelfPlayStage(SamplingStage):
    """SPIN's comparisons: each demonstration over ``policy``'s own answer to its prompt."""

    kind: ClassVar[str] = "self_play"
    AT_LEAST: ClassVar[dict[str, float]] = {"num_prompts": 1}
    demonstrations: str | None = None
    num_prompts: int = 1000


@dataclass(frozen=True, kw_only=True)
class BestOfNStage(StageSpec):
    """The best-of-n baseline on the held-out prompts, with the evaluation's sampling; measured only."""

    kind: ClassVar[str] = "best_of_n"
    AT_LEAST: ClassVar[dict[str, float]] = {"n": 1, "max_prompt_length": 1}
    policy: str
    reward_model: str
    n: int = 8
    max_prompt_length: int | None = None
    """``None``: the evaluation's."""


@dataclass(frozen=True, kw_only=True)
class OptimumStage(StageSpec):
    """The KL-regularised optimum π*(y|x) ∝ π(y|x)·exp(r(x,y)/β) of ``policy`` and ``reward_model`` on the held-out
    prompts, estimated by self-normalised importance weights over ``n`` samples of ``policy`` per prompt; measured
    only, as a yardstick for the trained policies."""

    kind: ClassVar[str] = "optimum"
    AT_LEAST: ClassVar[dict[str, float]] = {"n": 2, "beta": 0.001, "min_effective_sample_size": 1,
                                            "num_prompts": 2, "max_prompt_length": 1}
    policy: str
    reward_model: str
    beta: float = 0.5
    """Per nat of KL, as PPO's ``kl_control.beta``."""
    n: int = 64
    """Samples of ``policy`` per prompt."""
    num_prompts: int | None = None
    """The first this many distinct held-out prompts; ``None``: all of the evaluation's."""
    normalize_scores: bool = True
    """Score in the reward model's stored standard deviations, as PPO does by default."""
    score_clip: float | None = 5.0
    min_effective_sample_size: float = 4.0
    """Below this mean effective sample size per prompt the estimate is refused."""
    max_prompt_length: int | None = None
    """``None``: the evaluation's."""


@dataclass(frozen=True, kw_only=True)
class EnsembleStage(StageSpec):
    """Reward models combined at scoring time (Coste et al. 2024): ``members``' scores, each normalised on its own
    SFT samples, combined by ``rule``. Writes ``ensemble/ensemble.json``, which loads wherever a reward model
    does (PPO's ``reward_model``, best-of-n, rejection sampling, collect's ``judge_model``, the evaluation)."""

    kind: ClassVar[str] = "ensemble"
    AT_LEAST: ClassVar[dict[str, float]] = {"uncertainty_penalty": 0}
    members: list[str]
    """Reward models: stages or exports, at least two."""
    rule: Literal["mean", "worst_case", "uncertainty"] = "mean"
    """``mean``, ``worst_case`` (the minimum over members) or ``uncertainty`` (the mean less λ × their variance)."""
    uncertainty_penalty: float = 1.0
    """λ of ``uncertainty``, per unit of variance of the normalised scores."""


@dataclass(frozen=True, kw_only=True)
class WeightAverageStage(StageSpec):
    """WARM (Ramé et al. 2024): ``members``, reward models fine-tuned from the same start, averaged in weight space
    into one export (``hf``), its score statistics measured again on ``statistics_policy``'s answers."""

    kind: ClassVar[str] = "weight_average"
    AT_LEAST: ClassVar[dict[str, float]] = {"normalization_samples": 2}
    members: list[str]
    """Reward models: stages or exports of one architecture, at least two."""
    statistics_policy: str
    """The policy whose answers (to the training prompts) set the score statistics, as the reward phase's."""
    normalization_samples: int = 256


@dataclass(frozen=True, kw_only=True)
class LengthCorrectedStage(StageSpec):
    """The post-hoc length fix: ``reward_model`` less its least-squares dependence on answer length, fitted on
    ``statistics_policy``'s answers to the training prompts; exported (``hf``) with the slope and new statistics."""

    kind: ClassVar[str] = "length_corrected"
    AT_LEAST: ClassVar[dict[str, float]] = {"normalization_samples": 2}
    reward_model: str
    statistics_policy: str
    normalization_samples: int = 256


# --- shorthands: rounds of stages ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Rounds(StageSpec, ABC):
    """A shorthand: ``rounds`` rounds of plain stages, each starting from the previous round's policy."""

    AT_LEAST: ClassVar[dict[str, float]] = {"rounds": 1}
    policy: str
    config: str
    rounds: int = 1
    args: dict[str, Any] = field(default_factory=dict)

    def expand(self) -> list[StageSpec]:
        """The plain stages, named ``<name><round>_<step>`` (``<name>_<step>`` with one round)."""
        stages: list[StageSpec] = []
        policy = self.policy
        for round_ in range(1, self.rounds + 1):
            prefix = f"{self.name}{round_}" if self.rounds > 1 else self.name
            stages += self._round(prefix, policy, stages)
            policy = prefix
        return stages

    @abstractmethod
    def _round(self, prefix: str, policy: str, earlier: list[StageSpec]) -> list[StageSpec]:
        """One round's stages, named from ``prefix``, starting from ``policy``, after the ``earlier`` rounds'."""


@dataclass(frozen=True, kw_only=True)
class RejectionSamplingRounds(Rounds):
    """Rejection-sampling fine-tuning: per round, ``rejection_sample`` → ``fit`` (SFT) on the picks."""

    kind: ClassVar[str] = "rejection_sampling"
    AT_LEAST: ClassVar[dict[str, float]] = RejectionSampleStage.AT_LEAST | {"temperature": 0}
    reward_model: str
    n: int = RejectionSampleStage.n
    keep: int = RejectionSampleStage.keep
    threshold: float | None = RejectionSampleStage.threshold
    num_prompts: int = RejectionSampleStage.num_prompts
    temperature: float = RejectionSampleStage.temperature

    def _round(self, prefix: str, policy: str, earlier: list[StageSpec]) -> list[StageSpec]:
        picks = RejectionSampleStage(name=f"{prefix}_data", policy=policy, reward_model=self.reward_model, n=self.n,
                                     keep=self.keep, threshold=self.threshold, num_prompts=self.num_prompts,
                                     temperature=self.temperature)
        return [picks, FitStage(name=prefix, config=self.config, model=policy, data=picks.name, args=self.args)]


@dataclass(frozen=True, kw_only=True)
class SpinRounds(Rounds):
    """SPIN: per round, ``self_play`` → ``fit`` (DPO) on the pairs, referenced to the previous round's model."""

    kind: ClassVar[str] = "spin"
    AT_LEAST: ClassVar[dict[str, float]] = SelfPlayStage.AT_LEAST | {"temperature": 0}
    demonstrations: str | None = SelfPlayStage.demonstrations
    num_prompts: int = SelfPlayStage.num_prompts
    temperature: float = SelfPlayStage.temperature

    def _round(self, prefix: str, policy: str, earlier: list[StageSpec]) -> list[StageSpec]:
        pairs = SelfPlayStage(name=f"{prefix}_data", policy=policy, demonstrations=self.demonstrations,
                              num_prompts=self.num_prompts, temperature=self.temperature)
        return [pairs, FitStage(name=prefix, config=self.config, model=policy, data=pairs.name, args=self.args)]


@dataclass(frozen=True, kw_only=True)
class IterativeRounds(Rounds):
    """Iterative RLHF: per round, ``collect`` from the current policy → a reward model → PPO on it, or DPO on the
    comparisons."""

    kind: ClassVar[str] = "iterative"
    AT_LEAST: ClassVar[dict[str, float]] = CollectStage.AT_LEAST
    rm_config: str
    rm_args: dict[str, Any] = field(default_factory=dict)
    algorithm: Literal["ppo", "dpo"] = "ppo"
    reward_init: Literal["policy", "previous"] = "policy"
    """``policy``: each round's reward model starts from the round's policy; ``previous``: continues the last one."""
    k: int = CollectStage.k
    num_prompts: int = CollectStage.num_prompts
    judge: Literal[JUDGES] | None = CollectStage.judge
    judge_model: str | None = CollectStage.judge_model
    reward: str | None = CollectStage.reward
    principles: str | None = CollectStage.principles

    def _round(self, prefix: str, policy: str, earlier: list[StageSpec]) -> list[StageSpec]:
        collect = CollectStage(name=f"{prefix}_collect", policy=policy, k=self.k, num_prompts=self.num_prompts,
                               judge=self.judge, judge_model=self.judge_model, reward=self.reward,
                               principles=self.principles)
        # Continuing the last round's reward model, its score statistics must still come from this round's policy.
        rm_start = earlier[-2].name if self.reward_init == "previous" and earlier else policy
        reward_model = FitStage(name=f"{prefix}_rm", config=self.rm_config, model=rm_start, data=collect.name,
                                statistics_policy=policy, args=self.rm_args)
        inputs = {"reward_model": reward_model.name} if self.algorithm == "ppo" else {"data": collect.name}
        return [collect, reward_model, FitStage(name=prefix, config=self.config, model=policy, args=self.args,
                                                **inputs)]


STAGES: dict[str, type[StageSpec]] = {
    spec.kind: spec for spec in (FitStage, CollectStage, RejectionSampleStage, SelfPlayStage, BestOfNStage,
                                 OptimumStage, EnsembleStage, WeightAverageStage, LengthCorrectedStage)
}
SHORTHANDS: dict[str, type[Rounds]] = {
    spec.kind: spec for spec in (RejectionSamplingRounds, SpinRounds, IterativeRounds)
}
CONFIG_KEYS = ("config", "rm_config")
"""Phase configs, relative to the pipeline file."""
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The package's phase configs, where a pipeline file's ``config`` is looked up when it is not beside the file (a
copied ``pipeline_hf.yaml`` still finds ``sft.yaml``)."""


# --- the evaluation and the file -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EvaluationSpec:
    """How the summary measures every policy: the same held-out prompts, each ``samples_per_prompt`` times, the same
    sampling noise, KL and the hacking metrics against ``reference``, the proxy reward by ``reward_model``."""

    AT_LEAST: ClassVar[dict[str, float]] = {"num_prompts": 1, "samples_per_prompt": 1, "max_new_tokens": 1,
                                            "temperature": 0, "max_prompt_length": 1}
    prompts: str | None = None
    """``None``: the file's ``prompts``, else the world's test prompts."""
    num_prompts: int = 512
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0
    max_prompt_length: int = 32
    seed: int = 1234
    init: str | None = None
    reference: str | None = None
    reward_model: str | None = None


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """A whole pipeline file, its shorthands expanded and its phase configs absolute."""

    stages: list[StageSpec]
    out: str = "runs/pipeline"
    seed: int = 0
    prompts: str | None = None
    """Training prompts of the sampling stages that name none, and the held-out ones without
    ``evaluation.prompts``; ``None``: the world's."""
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    on_bad_row: Literal["error", "skip"] = "error"
    """What a bad row of any data file does, in every stage (a fit stage's ``data.on_bad_row``, a sampling stage's
    own ``on_bad_row``, the held-out prompts): ``error`` stops the run naming it, ``skip`` leaves it out, counted."""

    def training_prompts(self, stage: CollectStage | RejectionSampleStage) -> str | None:
        """The training prompts a sampling stage uses: its own ``prompts``, else the file's, else (``None``) the
        world's."""
        return stage.prompts if stage.prompts is not None else self.prompts

    @property
    def held_out_prompts(self) -> str | None:
        """The held-out prompts: ``evaluation.prompts``, else the file's ``prompts``, else (``None``) the world's."""
        return self.evaluation.prompts if self.evaluation.prompts is not None else self.prompts

    def bad_rows(self, stage: StageSpec) -> Literal["error", "skip"]:
        """What a bad row does in ``stage``: a sampling stage's own ``on_bad_row``, or a fit stage's
        ``data.on_bad_row`` among its ``args``, else the file's."""
        own = stage.args.get("data.on_bad_row", stage.args.get("data.init_args.on_bad_row")) \
            if isinstance(stage, FitStage) else getattr(stage, "on_bad_row", None)
        return own or self.on_bad_row


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and check a pipeline file; shorthands are expanded and phase configs made absolute."""
    path = Path(path)
    raw = read_yaml_file(path, "pipeline") or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'stages' list")
    stages: list[StageSpec] = []
    for index, raw_stage in enumerate(raw["stages"], start=1):
        stage = _stage(raw_stage, index, path)
        stages += stage.expand() if isinstance(stage, Rounds) else [stage]
    names = [stage.name for stage in stages]
    for name in names:
        if names.count(name) > 1 or name == RESERVED_NAME:
            raise ConfigError(f"{path}: stage name {name!r} is used twice (or is the reserved {RESERVED_NAME!r})")
    for index, stage in enumerate(stages):
        later = sorted(stage.reads() & set(names[index:]))
        if later:
            raise ConfigError(f"{path}: stage {stage.name!r} reads {later[0]!r}, which runs after it (or is itself): "
                              "a stage reads only earlier stages")
    evaluation = build_spec(EvaluationSpec, raw.get("evaluation") or {}, f"{path}: evaluation")
    spec = build_spec(PipelineSpec, {**raw, "stages": stages, "evaluation": evaluation}, str(path))
    if not (evaluation.prompts or spec.prompts) and _reads_own_data(stages):
        raise ConfigError(
            f"{path}: evaluation.prompts is unset, but the stages read your own data: name held-out prompts of it for "
            "the summary (any file with a prompt column); the world's prompts only suit the world's models"
        )
    return spec


def check_data_files(spec: PipelineSpec) -> None:
    """Read every local data file the stages and the evaluation will read, as the stage reading it will, before the
    first stage runs: a bad row (under ``on_bad_row: error``), a missing file or a file without a usable row stops
    the run here, in one line, rather than after the stages before its reader have trained. Chat rows are rendered
    with the default template here (the model whose template a stage uses may not exist yet); hub datasets are
    read by their stage."""
    for path, kind, on_bad_row in sorted(set(data_files(spec))):
        if not is_local(path):
            continue
        rows = normalize_rows(read_rows(path), kind, path, on_bad_row=on_bad_row)
        if not rows.records:
            raise DataError(f"{path}: no usable {kind} rows ({rows.rows} read, {rows.skipped_rows} skipped)")


def data_files(spec: PipelineSpec) -> list[tuple[str, str, str]]:
    """``(path, record kind, on_bad_row)`` of every data file the run reads that no stage writes."""
    names = {stage.name for stage in spec.stages}
    files = []
    for stage in spec.stages:
        if isinstance(stage, FitStage):
            paths = [stage.data, stage.args.get("data.path"), stage.args.get("data.init_args.path")]
            files += [(path, _fit_data_kind(stage), spec.bad_rows(stage)) for path in paths
                      if isinstance(path, str) and path not in names]
        elif isinstance(stage, (CollectStage, RejectionSampleStage)) and (prompts := spec.training_prompts(stage)):
            files.append((prompts, "prompt", spec.bad_rows(stage)))
        elif isinstance(stage, SelfPlayStage) and stage.demonstrations:
            files.append((stage.demonstrations, "demonstration", spec.bad_rows(stage)))
    if spec.held_out_prompts:
        files.append((spec.held_out_prompts, "prompt", spec.on_bad_row))
    return files


def _fit_data_kind(stage: FitStage) -> str:
    """The record kind a fit stage's data module reads (its ``kind``), from ``data.class_path`` in its ``args`` or
    its phase config (or a config that one extends)."""
    class_path = stage.args.get("data.class_path") or _data_class_path(Path(stage.config))
    module, _, name = (class_path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name).kind
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"stage {stage.name!r}: {stage.config} names no data module with a record kind "
                          f"(data.class_path {class_path!r})") from None


def _data_class_path(config: Path) -> str | None:
    """``data.class_path`` of a phase config: its own, else that of the file its ``config:`` extends, as jsonargparse
    reads them."""
    raw = read_yaml_file(config, "phase config") or {}
    data = raw.get("data")
    own = raw.get("data.class_path") or (data.get("class_path") if isinstance(data, dict) else None)
    extended = raw.get("config")
    for name in ([] if own else extended if isinstance(extended, list) else [extended]):
        if isinstance(name, str) and (found := _data_class_path(config.parent / name)):
            return found
    return own


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML file's contents, or a one-line :class:`ConfigError`: the ``what`` file is not there, or where (line and
    column) and why it is not valid YAML (PyYAML's own message runs to several lines)."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


def _stage(raw: Any, index: int, path: Path) -> StageSpec:
    """One entry of ``stages`` as its spec, its phase configs found relative to the pipeline file, else among the
    package's (:data:`PACKAGE_CONFIGS`)."""
    if not isinstance(raw, dict) or "name" not in raw or "kind" not in raw:
        raise ConfigError(f"{path}: stage {index} needs a 'name' and a 'kind'")
    spec_class = {**STAGES, **SHORTHANDS}.get(raw["kind"]) if isinstance(raw["kind"], str) else None
    if spec_class is None:
        raise ConfigError(f"{path}: stage {raw['name']!r} has unknown kind {raw['kind']!r}; expected one of "
                          f"{', '.join([*STAGES, *SHORTHANDS])}")
    where = f"{path}: stage {raw['name']!r} ({raw['kind']})"
    stage = build_spec(spec_class, {key: value for key, value in raw.items() if key != "kind"}, where)
    configs = {}
    for key in (key for key in CONFIG_KEYS if hasattr(stage, key)):
        beside, packaged = (path.parent / getattr(stage, key)).resolve(), PACKAGE_CONFIGS / getattr(stage, key)
        if not beside.is_file() and not packaged.is_file():
            raise ConfigError(f"{where}: config not found: {beside} (nor among the package's, {PACKAGE_CONFIGS})")
        configs[key] = str(beside if beside.is_file() else packaged.resolve())
    return replace(stage, **configs)


def _reads_own_data(stages: list[StageSpec]) -> bool:
    """Whether a stage reads data that is neither the world's nor another stage's output."""
    names = {stage.name for stage in stages}
    named = [getattr(stage, key, None) for stage in stages for key in ("data", "prompts", "demonstrations")]
    overridden = [key for stage in stages for key in getattr(stage, "args", {})
                  if key.startswith("data.") and key.endswith(".path")]
    return bool(overridden) or any(value not in (None, *names) for value in named)


# --- building a spec from YAML -------------------------------------------------------------------------------------


def build_spec(spec_class: type[Spec], raw: Mapping[str, Any], where: str) -> Spec:
    """``raw`` as a ``spec_class``: an unknown key, a missing one or a value of the wrong type is a
    :class:`ConfigError` of one line that starts with ``where``. Integers are taken for floats."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {raw!r}")
    keys = [spec_field.name for spec_field in fields(spec_class)]
    unknown = [key for key in raw if key not in keys]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(keys)}")
    missing = [spec_field.name for spec_field in fields(spec_class) if spec_field.name not in raw
               and spec_field.default is MISSING and spec_field.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where} needs {', '.join(missing)}")
    types_ = get_type_hints(spec_class)
    values = {}
    for key, value in raw.items():
        if not _is_a(value, types_[key]):
            raise ConfigError(f"{where}: {key} must be {_describe(types_[key])}, got {value!r}")
        takes_float = float in (get_args(types_[key]) or (types_[key],))
        values[key] = float(value) if takes_float and value is not None else value
    for key, bound in _lower_bounds(spec_class).items():
        if values.get(key) is not None and values[key] < bound:
            raise ConfigError(f"{where}: {key} must be at least {bound}, got {values[key]!r}")
    return spec_class(**values)


def build_spec_from_text(spec_class: type[Spec], texts: Mapping[str, str], where: str) -> Spec:
    """``texts``, a command line's values, as a ``spec_class``, checked by :func:`build_spec` as a file's values are:
    a value that its field takes as text stays text, any other reads as YAML reads it (``4``, ``0.7``, ``true``)."""
    types_ = get_type_hints(spec_class)
    return build_spec(spec_class, {key: text if key not in types_ or _is_a(text, types_[key]) else _yaml_value(text)
                                   for key, text in texts.items()}, where)


def _yaml_value(text: str) -> Any:
    """``text`` as a YAML value; text that is not valid YAML stays text, for :func:`build_spec` to refuse."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def field_docs(spec_class: type) -> dict[str, str]:
    """Each field's docstring (the string under it in its class, or a base's), its lines joined."""
    docs: dict[str, str] = {}
    for klass in filter(is_dataclass, reversed(spec_class.__mro__)):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return {spec_field.name: docs[spec_field.name] for spec_field in fields(spec_class) if spec_field.name in docs}


def literal_choices(expected: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` field type (or an optional one) allows; none for any other type."""
    options = get_args(expected) if get_origin(expected) in (Union, types.UnionType) else (expected,)
    return tuple(choice for option in options if get_origin(option) is Literal for choice in get_args(option))


def _lower_bounds(spec_class: type) -> dict[str, float]:
    """The ``AT_LEAST`` bounds of a spec class and its bases."""
    bounds: dict[str, float] = {}
    for klass in reversed(spec_class.__mro__):
        bounds |= vars(klass).get("AT_LEAST", {})
    return bounds


def _is_a(value: Any, expected: Any) -> bool:
    """Whether a YAML value fits a field's type (the types the specs use)."""
    origin = get_origin(expected)
    if origin in (Union, types.UnionType):
        return any(_is_a(value, option) for option in get_args(expected))
    if origin is Literal:
        return value in get_args(expected)
    if origin is list and get_args(expected):
        return isinstance(value, list) and all(_is_a(item, get_args(expected)[0]) for item in value)
    if origin in (dict, list):
        return isinstance(value, origin)
    if expected is Any:
        return True
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    """A field's type in a user's words: ``an integer``, ``text or null``, ``one of ppo, dpo``."""
    origin = get_origin(expected)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(expected))
    if origin is Literal:
        return f"one of {', '.join(map(str, get_args(expected)))}"
    if origin is list and get_args(expected):
        return f"a list of {_describe(get_args(expected)[0])}"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false", dict: "a mapping",
            list: "a list", type(None): "null"}.get(origin or expected, str(expected))
