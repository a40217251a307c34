"""The held-out evaluation every policy of a pipeline run is measured with (the same prompts, sampling noise,
reference and reward model), and the run's summary: one row per stage and the paired differences between policies.
Sweeps measure their trials with the same evaluation, on the development prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import PreTrainedModel

from lit_rlhf.collect import sample_responses
from lit_rlhf.data.datamodules import PromptDataModule, default_world_dir
from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import (
    HeldOutEvaluator,
    PolicyEvaluation,
    measure_answers,
    measure_reward_model,
    paired_differences,
)
from lit_rlhf.generation import Response, SamplingConfig
from lit_rlhf.models import WORLD, inference_device, load_causal_lm, load_tokenizer
from lit_rlhf.pipeline_run import BASELINE, BOOKKEEPING_KEYS, POLICY, REWARD_MODEL, PipelineRun
from lit_rlhf.run_folder import EVAL_SAMPLES_FILE, PAIRED_METRICS, PROXY_SCORER, write_jsonl
from lit_rlhf.scoring import Scorer, make_scorer
from lit_rlhf.selection import pick_best
from lit_rlhf.world import Rater, ensure_world, speaks_world_language

SUMMARY_METRICS = {
    "gold_reward": "gold/reward",
    "gold_reward_se": "gold/reward_se",
    "proxy_reward": "proxy/reward",
    "proxy_reward_se": "proxy/reward_se",
    "kl": "objective/kl",
    "kl_se": "objective/kl_se",
    "length_mean": "response/length_mean",
    "length_ratio": "hacking/length_ratio",
    "sycophancy_rate": "hacking/sycophancy_rate",
    "format_rate": "hacking/format_rate",
    "repetition_rate": "hacking/repetition_rate",
    "proxy_gap": "gold/proxy_gap",
}
"""A policy's summary columns and the evaluation metrics they hold (:func:`lit_rlhf.evaluation.evaluate_policy`);
``<column>_se`` is the standard error of ``<column>``, clustered by prompt."""
SUMMARY_KEYS = ("stage", *SUMMARY_METRICS, "seconds")
COST_KEYS = ("updates", "generated")
"""What a stage cost besides its ``seconds``: optimiser updates, and answers it sampled (PPO's rollouts, collect's,
best-of-n's and the optimum's samples; DPO samples none)."""
SAMPLES_PER_STAGE = 4
"""Answers per policy written to ``eval_samples.jsonl`` for the report, each to another held-out prompt."""
SAMPLING_BATCH_SIZE = 256
"""Prompts a sampling stage, or best-of-n, sends through the policy at once."""
EVALUATION_BATCH_SIZE = 128
"""Prompts the held-out evaluation sends through a policy at once."""


class HeldOutEvaluation:
    """What every policy of a run is measured with (the file's ``evaluation``): the same held-out prompts, each
    repeated ``samples_per_prompt`` times, the same sampling noise, the ``reference`` policy that KL and the hacking
    metrics are measured against, and the ``reward_model`` that gives the proxy reward; prompts are cut from the left
    to ``max_prompt_length`` tokens (by default the world's; set it to the phases' own on other data). Sweeps
    measure their trials with it too, on the world's development prompts (``split``), so a sweep's numbers and a
    pipeline's summary are measured alike, on different prompts."""

    def __init__(self, run: PipelineRun, split: str = "test") -> None:
        self.spec = run.spec.evaluation
        self.split = split
        """The world's held-out prompts it reads where the file names none: ``test`` (the summary) or ``dev``
        (a sweep's trials, which choose settings)."""
        self.prompts_path = run.spec.held_out_prompts
        """The held-out prompts: ``evaluation.prompts``, else the file's ``prompts``, else the world's (``split``)."""
        self.num_prompts = self.spec.num_prompts
        self.repeats = self.spec.samples_per_prompt
        self.sampling = SamplingConfig(self.spec.max_new_tokens, self.spec.temperature)
        self.seed = self.spec.seed
        self.max_prompt_length = self.spec.max_prompt_length
        """Prompts longer than this (in tokens) are cut from the left, as the phases cut them."""
        self.run = run

    @cached_property
    def prompts(self) -> list[str]:
        """Each held-out prompt ``samples_per_prompt`` times, chat prompts rendered with the template of the
        policies' tokenizer (the reference's, else the init model's): what the policies were trained to read."""
        tokenizer = self.reference_path or self.spec.init or WORLD
        if self.prompts_path is None and not speaks_world_language(load_tokenizer(tokenizer)):
            raise ConfigError(f"evaluation.prompts is unset, and {tokenizer} cannot read the world's prompts: name "
                              "held-out prompts of your own data (any file with a prompt column)")
        path = self.prompts_path or str(ensure_world(default_world_dir())[f"{self.split}_prompts"])
        prompts = PromptDataModule(path=path, tokenizer_name_or_path=tokenizer, val_fraction=0.0,
                                   max_prompt_length=self.max_prompt_length,
                                   max_length=self.max_prompt_length + self.sampling.max_new_tokens,
                                   num_eval_prompts=self.num_prompts, on_bad_row=self.run.spec.on_bad_row)
        prompts.setup("fit")
        return [p for p in prompts.eval_prompts for _ in range(self.repeats)]

    @cached_property
    def reference_path(self) -> str | None:
        """Resolved when first needed: a best-of-n stage may run before the stages the evaluation names."""
        return self.run.resolve(self.spec.reference, "model")

    @cached_property
    def reward_model(self) -> str | None:
        return self.run.resolve(self.spec.reward_model, "model")

    @cached_property
    def scorer(self) -> Scorer | None:
        return make_scorer(self.reward_model, device=inference_device()) if self.reward_model else None

    @cached_property
    def evaluator(self) -> HeldOutEvaluator:
        """The prompts answered, scored and compared with the reference's answers as in every phase's validation."""
        tokenizer = load_tokenizer(self.reference_path or self.spec.init or WORLD)
        return HeldOutEvaluator(self.prompts, tokenizer, self.sampling, self.max_prompt_length, self.seed,
                                EVALUATION_BATCH_SIZE, self.scorer)

    @property
    def gold(self) -> Scorer | None:
        """The world's gold reward on the held-out prompts, where they are the world's."""
        return self.evaluator.gold

    @cached_property
    def reference(self) -> PreTrainedModel | None:
        if not self.reference_path:
            return None
        tokenizer = load_tokenizer(self.reference_path)
        return load_causal_lm(self.reference_path, tokenizer, device=inference_device()).eval()

    @property
    def baseline(self) -> PolicyEvaluation | None:
        """The reference policy's own evaluation, which drift and hacking metrics compare against."""
        return self.evaluator.baseline(self.reference) if self.reference is not None else None

    def policy(self, name_or_path: str) -> PolicyEvaluation:
        """A policy's :class:`lit_rlhf.evaluation.PolicyEvaluation`."""
        tokenizer = load_tokenizer(name_or_path)
        torch.manual_seed(self.run.seed)  # the untrained world model is built from this seed
        model = load_causal_lm(name_or_path, tokenizer, device=inference_device()).eval()
        return self.evaluator.evaluate(model, self.reference, tokenizer)

    def sample_groups(self, policy: str, n: int, max_prompt_length: int | None = None) -> list[list[Response]]:
        """``n`` samples of ``policy`` for each held-out prompt, with the evaluation's sampling and seed."""
        torch.manual_seed(self.seed)
        return sample_responses(policy, self.prompts, n, self.sampling, max_prompt_length or self.max_prompt_length,
                                SAMPLING_BATCH_SIZE)

    def best_picks(self, policy: str, reward_model: str, groups: list[list[Response]]) -> list[dict]:
        """The best sample of each prompt's group by ``reward_model``: ``{"prompt", "response", "score", "ended",
        "length"}`` (length in tokens of ``policy``'s tokenizer)."""
        scorer = self.scorer_for(reward_model)
        tokenizer = load_tokenizer(policy)
        return [{**vars(pick), "length": len(tokenizer(pick.response, add_special_tokens=False)["input_ids"])}
                for pick in pick_best(self.prompts, groups, scorer)]

    def picks(self, picks: list[dict]) -> PolicyEvaluation:
        """The :class:`lit_rlhf.evaluation.PolicyEvaluation` of best-of-n picks, measured like a policy's answers: the
        proxy reward is the evaluation's reward model's score, whichever reward model picked them."""
        prompts, responses = [p["prompt"] for p in picks], [p["response"] for p in picks]
        finished = [p.get("ended", True) for p in picks]  # samples.jsonl of earlier versions lacks "ended"
        proxy = self.scorer.score(prompts, responses, finished).float().tolist() if self.scorer else None
        gold = self.gold.score(prompts, responses, finished).tolist() if self.gold is not None else None
        return measure_answers(prompts, responses, [p["length"] for p in picks], proxy, self.baseline, gold)

    def scorer_for(self, reward_model: str) -> Scorer:
        """The scorer of ``reward_model``: the evaluation's own when it is the evaluation's reward model."""
        return self.scorer if reward_model == self.reward_model else make_scorer(reward_model,
                                                                                 device=inference_device())

    def reward_model_row(self, reward_model: str) -> dict[str, Any]:
        """A reward model's summary columns measured on every pair of different reference answers to a held-out
        prompt (:func:`lit_rlhf.evaluation.measure_reward_model`): ``accuracy`` against the world's raters,
        ``gold_accuracy``, each with its standard error, ``rater_ceiling`` (the most ``accuracy`` any scorer
        reaches on these pairs), ``rater_agreement`` (two raters' agreement) and the number of ``test_pairs``;
        none where too few pairs differ (one answer per prompt): then the row keeps the reward phase's validation
        numbers."""
        baseline = self.baseline
        scorer = self.scorer_for(reward_model)
        scores = scorer.score(baseline.prompts, baseline.responses, baseline.ended).float().tolist()
        measured = measure_reward_model(baseline.prompts, baseline.responses, scores, baseline.gold,
                                        Rater().probability)
        if measured is None:
            return {}
        return {"accuracy": measured.accuracy.mean, "accuracy_se": measured.accuracy.se,
                "gold_accuracy": measured.gold_accuracy.mean, "gold_accuracy_se": measured.gold_accuracy.se,
                "rater_ceiling": measured.rater_ceiling.mean, "rater_agreement": measured.rater_agreement.mean,
                "test_pairs": measured.pairs}

    def row(self, evaluation: PolicyEvaluation) -> dict[str, Any]:
        """An evaluation as summary columns (None where a metric does not apply)."""
        return {key: evaluation.metrics.get(metric) for key, metric in SUMMARY_METRICS.items()}

    def samples(self, stage: str, evaluation: PolicyEvaluation) -> list[dict[str, Any]]:
        """A few answers of one stage, to different prompts, for the report."""
        rows = range(0, len(evaluation.prompts), self.repeats)
        return [
            {"stage": stage, "prompt": evaluation.prompts[i], "response": evaluation.responses[i],
             "gold": evaluation.gold[i] if evaluation.gold else None,
             "proxy": evaluation.proxy[i] if evaluation.proxy else None}
            for i in list(rows)[:SAMPLES_PER_STAGE]
        ]


@dataclass
class Summary:
    """What the summary measured: one row per stage (``summary.json``) and the paired differences between every two
    policies on the same prompts (``paired.json``)."""

    rows: list[dict[str, Any]]
    paired: list[dict[str, Any]]


def summarize(run: PipelineRun) -> Summary:
    """One row per stage (and the ``init`` row): policies evaluated here, reward models measured on pairs of the
    reference's answers where the prompts have gold (else their validation numbers), the rest from their
    ``done.json``; a few answers of each policy go to ``eval_samples.jsonl``."""
    evaluation = HeldOutEvaluation(run)
    rows, samples, policies = [], [], {}

    def measured(stage: str, result: PolicyEvaluation) -> dict[str, Any]:
        samples.extend(evaluation.samples(stage, result))
        policies[stage] = result
        row = evaluation.row(result)
        return row | ({PROXY_SCORER: evaluation.spec.reward_model} if "proxy_reward" in row else {})

    if evaluation.spec.init:
        rows.append({"stage": "init", **measured("init", evaluation.policy(evaluation.spec.init)),
                     "seconds": 0.0})
    for stage in run.spec.stages:
        done = run.done(stage.name)
        row: dict[str, Any] = {"stage": stage.name}
        if done["role"] == POLICY:
            row |= measured(stage.name, evaluation.policy(str(run.out_dir / stage.name / done["model"])))
            row |= {key: done[key] for key in COST_KEYS + ("health_breaches",) if key in done}
        elif done["role"] == BASELINE:
            picks = [json.loads(line) for line in (run.out_dir / stage.name / done["samples"]).open()]
            row |= measured(stage.name, evaluation.picks(picks)) | {"kl": done["kl"], "n": done["n"],
                                                                      "generated": done["generated"]}
        else:
            row |= {key: value for key, value in done.items() if key not in BOOKKEEPING_KEYS}
            if done["role"] == REWARD_MODEL and evaluation.gold is not None and evaluation.baseline is not None:
                row |= evaluation.reward_model_row(str(run.out_dir / stage.name / done["model"]))
        rows.append({**row, "seconds": done["seconds"]})
    write_jsonl(run.out_dir / EVAL_SAMPLES_FILE, samples)
    return Summary(rows, paired_rows(policies, exclude=("init",)))


def paired_rows(policies: dict[str, PolicyEvaluation], exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``paired.json``'s rows: for every two policies (``a`` the later stage) and each of :data:`PAIRED_METRICS`,
    the mean over prompts of a − b with its 95 % interval (:func:`lit_rlhf.evaluation.paired_differences`)."""
    names = [name for name in policies if name not in exclude]
    rows = []
    for later, a in enumerate(names):
        for b in names[:later]:
            for column in PAIRED_METRICS:
                interval = paired_differences(policies[a], policies[b], SUMMARY_METRICS[column])
                if interval is not None:
                    rows.append({"a": a, "b": b, "metric": column, **interval.as_dict()})
    return rows
