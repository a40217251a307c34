"""What each kind of pipeline stage does (:data:`STAGE_RUNNERS`): run a Lightning phase, collect comparisons,
rejection-sample or self-play data, best-of-n on the held-out prompts, the KL-regularised optimum, reward models
made from trained ones (an ensemble, a weight average, a length-corrected one). Each takes its
spec, its folder and the run, and returns the record its ``done.json`` keeps."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lit_rlhf.advantages import clip_scores, normalize_scores
from lit_rlhf.collect import collect_comparisons, sample_responses
from lit_rlhf.data.datamodules import DemonstrationDataModule, PromptDataModule, subsample
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.held_out import SAMPLING_BATCH_SIZE, HeldOutEvaluation
from lit_rlhf.models import inference_device
from lit_rlhf.phases.ppo_health import PPOHealth
from lit_rlhf.phases.reward import RewardModelModule
from lit_rlhf.pipeline_run import BASELINE, DATA, POLICY, REWARD_MODEL, YARDSTICK, PipelineRun
from lit_rlhf.pipeline_spec import (
    BestOfNStage,
    CollectStage,
    EnsembleStage,
    FitStage,
    LengthCorrectedStage,
    OptimumStage,
    PipelineSpec,
    RejectionSampleStage,
    SamplingStage,
    SelfPlayStage,
    WeightAverageStage,
)
from lit_rlhf.reward_models import average_weights, export_reward_model, load_reward_model
from lit_rlhf.run_folder import HEALTH_FILE, write_atomically, write_jsonl
from lit_rlhf.scoring import LENGTH_KEYS, make_scorer, write_ensemble
from lit_rlhf.selection import best_of_n_kl, pick_best, self_play_pairs
from lit_rlhf.uncertainty import kl_regularized_optimum


def _run_fit(stage: FitStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    args = ["--config", stage.config, "--seed_everything", str(run.seed),
            "--model.init_args.export_dir", str(stage_dir / "hf")]
    for reference, key, output in ((stage.model, "model.init_args.model_name_or_path", "model"),
                                   (stage.reward_model, "model.init_args.reward_model", "model"),
                                   (stage.statistics_policy, "model.init_args.statistics_policy", "model"),
                                   (stage.data, "data.init_args.path", "data")):
        if reference:
            args += [f"--{key}", run.resolve(reference, output)]
    args += ["--data.init_args.on_bad_row", run.spec.bad_rows(stage)]  # its args, below, may set it too
    for key, value in stage.args.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    cli = run.fit_phase(args, str(stage_dir))
    role = REWARD_MODEL if isinstance(cli.model, RewardModelModule) else POLICY
    record: dict[str, Any] = {"kind": "fit", "role": role, "model": "hf", "updates": cli.trainer.global_step}
    if (generated := getattr(cli.model, "samples_generated", None)) is not None:
        record["generated"] = generated
    if isinstance(health := getattr(cli.model, "health", None), PPOHealth):
        write_atomically(stage_dir / HEALTH_FILE, json.dumps(health.breaches, indent=2) + "\n")
        record["health_breaches"] = len(health.breaches)
    if role == REWARD_MODEL:
        metrics = cli.trainer.callback_metrics
        record["accuracy"] = _float(metrics.get("val/accuracy"))
        record["gold_accuracy"] = _float(metrics.get("val/gold/accuracy"))
        record["length_corr"] = _float(metrics.get("val/reward/length_corr"))
    return record


def _run_collect(stage: CollectStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    summary = collect_comparisons(
        run.resolve(stage.policy, "model"), stage_dir, k=stage.k,
        judge=stage.judge, judge_model=run.resolve(stage.judge_model, "model"),
        reward=stage.reward, principles_path=stage.principles,
        prompts_path=run.spec.training_prompts(stage), num_prompts=stage.num_prompts,
        sampling=_sampling(stage), max_prompt_length=stage.max_prompt_length, seed=run.seed,
        on_bad_row=run.spec.bad_rows(stage),
    )
    return {"kind": "collect", "role": DATA, "data": "comparisons.jsonl", "generated": summary.prompts * summary.k,
            "pairs": summary.pairs,
            "ties_dropped": summary.ties_dropped, "gold_agreement": summary.gold_agreement}


def _sampling(stage: SamplingStage) -> SamplingConfig:
    """A sampling stage's decoding settings."""
    return SamplingConfig(stage.max_new_tokens, stage.temperature)


def _training_prompts(stage: RejectionSampleStage, spec: PipelineSpec, policy: str) -> list[str]:
    """A sampling stage's prompts (``num_prompts`` of them drawn with the file's seed, when there are more), chat
    prompts rendered with the template of the ``policy`` that answers them."""
    prompts = PromptDataModule(path=spec.training_prompts(stage), tokenizer_name_or_path=policy, val_fraction=0.0,
                               max_prompt_length=stage.max_prompt_length,
                               max_length=stage.max_prompt_length + stage.max_new_tokens,
                               on_bad_row=spec.bad_rows(stage))
    prompts.setup("fit")
    return [record.prompt for record in subsample(prompts.train_records, stage.num_prompts, spec.seed)]


def _run_rejection_sample(stage: RejectionSampleStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    policy = run.resolve(stage.policy, "model")
    prompts = _training_prompts(stage, run.spec, policy)
    torch.manual_seed(run.seed)
    groups = sample_responses(policy, prompts, stage.n, _sampling(stage), stage.max_prompt_length,
                              SAMPLING_BATCH_SIZE)
    scorer = make_scorer(run.resolve(stage.reward_model, "model"), device=inference_device())
    answers = [[response for response in group if response.text.strip()] for group in groups]  # EOS first: no answer
    picks = pick_best(prompts, answers, scorer, stage.keep, stage.threshold)  # an empty completion is a bad row
    write_jsonl(stage_dir / "demonstrations.jsonl",
                 [{"prompt": p.prompt, "completion": p.response, "completion_ended": p.ended} for p in picks])
    return {"kind": "rejection_sample", "role": DATA, "data": "demonstrations.jsonl", "rows": len(picks)}


def _run_self_play(stage: SelfPlayStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    policy = run.resolve(stage.policy, "model")
    demonstrations = DemonstrationDataModule(path=stage.demonstrations, tokenizer_name_or_path=policy,
                                             val_fraction=0.0, on_bad_row=run.spec.bad_rows(stage))
    demonstrations.setup("fit")
    records = subsample(demonstrations.train_records, stage.num_prompts, run.seed)
    torch.manual_seed(run.seed)
    prompts = [record.prompt for record in records]
    groups = sample_responses(policy, prompts, 1, _sampling(stage), stage.max_prompt_length, SAMPLING_BATCH_SIZE)
    pairs = self_play_pairs(prompts, [record.completion for record in records], [group[0] for group in groups])
    write_jsonl(stage_dir / "comparisons.jsonl", pairs)
    return {"kind": "self_play", "role": DATA, "data": "comparisons.jsonl", "pairs": len(pairs)}


def _run_best_of_n(stage: BestOfNStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    """Best-of-n on the held-out evaluation prompts; the summary measures its picks (``samples.jsonl``) like the
    policies' answers."""
    evaluation, policy = HeldOutEvaluation(run), run.resolve(stage.policy, "model")
    groups = evaluation.sample_groups(policy, stage.n, stage.max_prompt_length)
    picks = evaluation.best_picks(policy, run.resolve(stage.reward_model, "model"), groups)
    write_jsonl(stage_dir / "samples.jsonl", picks)
    return {"kind": "best_of_n", "role": BASELINE, "n": stage.n, "samples": "samples.jsonl",
            "generated": len(groups) * stage.n,
            "kl": best_of_n_kl(stage.n)}


def _run_optimum(stage: OptimumStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    """The KL-regularised optimum of ``policy`` and ``reward_model`` (:func:`lit_rlhf.uncertainty.
    kl_regularized_optimum`) on the distinct held-out prompts, ``n`` samples of ``policy`` each: its gold and proxy
    reward (the evaluation's reward model, as every row's) and its KL to ``policy``, with standard errors over prompts,
    and the effective sample size. Refused, with one line in the summary, where that is below
    ``min_effective_sample_size``: then a few samples carry all the weight and the numbers say little."""
    evaluation, policy = HeldOutEvaluation(run), run.resolve(stage.policy, "model")
    prompts = list(dict.fromkeys(evaluation.prompts))[: stage.num_prompts]
    torch.manual_seed(evaluation.seed)
    groups = sample_responses(policy, prompts, stage.n, evaluation.sampling,
                              stage.max_prompt_length or evaluation.max_prompt_length, SAMPLING_BATCH_SIZE)
    flat = [(prompt, response) for prompt, group in zip(prompts, groups) for response in group]
    texts, finished = [response.text for _, response in flat], [response.ended for _, response in flat]
    flat_prompts = [prompt for prompt, _ in flat]
    scorer = evaluation.scorer_for(run.resolve(stage.reward_model, "model"))
    raw = scorer.score(flat_prompts, texts, finished).double()
    statistics = getattr(scorer, "statistics", (0.0, 1.0))  # only a reward-model export stores them
    rewards = normalize_scores(raw, *statistics) if stage.normalize_scores else raw
    measures = {}
    if evaluation.scorer is not None:
        same = scorer is evaluation.scorer
        measures["proxy_reward"] = raw if same else evaluation.scorer.score(flat_prompts, texts, finished).double()
    if evaluation.gold is not None:
        measures["gold_reward"] = evaluation.gold.score(flat_prompts, texts, finished).double()
    shape = (len(prompts), stage.n)
    optimum = kl_regularized_optimum(clip_scores(rewards, stage.score_clip).cpu().view(shape), stage.beta,
                                     {name: values.cpu().view(shape) for name, values in measures.items()})
    record: dict[str, Any] = {"kind": "optimum", "role": YARDSTICK, "beta": stage.beta, "n": stage.n,
                              "generated": len(prompts) * stage.n,
                              "ess": round(optimum.effective_sample_size, 2),
                              "ess_min": round(optimum.min_effective_sample_size, 2)}
    if optimum.effective_sample_size < stage.min_effective_sample_size:
        record["refused"] = (f"effective sample size {optimum.effective_sample_size:.1f} of {stage.n} < "
                             f"{stage.min_effective_sample_size}: raise beta or n")
        return record
    for name, estimate in (*optimum.measures.items(), ("kl", optimum.kl)):
        record[name], record[f"{name}_se"] = estimate.mean, None if math.isnan(estimate.se) else estimate.se
    return record


def _run_ensemble(stage: EnsembleStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    members = [run.resolve(member, "model") for member in stage.members]
    write_ensemble(stage_dir / "ensemble", members, stage.rule, stage.uncertainty_penalty)
    return {"kind": "ensemble", "role": REWARD_MODEL, "model": "ensemble", "members": len(members)}


def _reward_model_prompts(run: PipelineRun, policy: str) -> list[str]:
    """The training prompts a reward model made here measures its score statistics on: the file's, else the
    world's."""
    prompts = PromptDataModule(path=run.spec.prompts, tokenizer_name_or_path=policy, val_fraction=0.0,
                               on_bad_row=run.spec.on_bad_row)
    prompts.setup("fit")
    return [record.prompt for record in prompts.train_records]


def _export_made_reward_model(model: PreTrainedModel, source: str, stage: WeightAverageStage | LengthCorrectedStage,
                              stage_dir: Path, run: PipelineRun, length_corrected: bool) -> dict[str, Any]:
    policy = run.resolve(stage.statistics_policy, "model")
    torch.manual_seed(run.seed)
    measured = export_reward_model(
        model, source, stage_dir / "hf", policy, _reward_model_prompts(run, policy), stage.normalization_samples,
        SamplingConfig(), getattr(model.config, LENGTH_KEYS["max_prompt_length"], 32), length_corrected,
    )
    return {"kind": stage.kind, "role": REWARD_MODEL, "model": "hf", **measured}


def _run_weight_average(stage: WeightAverageStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    members = [run.resolve(member, "model") for member in stage.members]
    models = [load_reward_model(member) for member in members]
    averaged = models[0]
    averaged.load_state_dict(average_weights(models))
    return _export_made_reward_model(averaged, members[0], stage, stage_dir, run, length_corrected=False)


def _run_length_corrected(stage: LengthCorrectedStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    source = run.resolve(stage.reward_model, "model")
    return _export_made_reward_model(load_reward_model(source), source, stage, stage_dir, run, length_corrected=True)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


STAGE_RUNNERS: dict[str, Callable[[Any, Path, PipelineRun], dict[str, Any]]] = {
    "fit": _run_fit,
    "optimum": _run_optimum,
    "collect": _run_collect,
    "rejection_sample": _run_rejection_sample,
    "self_play": _run_self_play,
    "best_of_n": _run_best_of_n,
    "ensemble": _run_ensemble,
    "weight_average": _run_weight_average,
    "length_corrected": _run_length_corrected,
}
