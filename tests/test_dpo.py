"""DPO phase: bandit optima, the world run, hand-worked losses per loss type, precomputed reference log-probs,
checkpoints and configs."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from helpers import latest_run, metric_rows, metric_series, run_cli, write_jsonl
from lit_rlhf import losses
from lit_rlhf.cli import main
from lit_rlhf.data.collate import collate_comparisons, collate_unpaired
from lit_rlhf.data.datamodules import ComparisonDataModule
from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import evaluate_policy
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import load_causal_lm, load_tokenizer, model_token_logprobs
from lit_rlhf.phases.dpo import DPOModule, loss_types
from lit_rlhf.phases.kto import KTOModule
from lit_rlhf.phases.preference import PreferenceModule
from lit_rlhf.phases.settings import OptimizerConfig
from lit_rlhf.scoring import gold_scorer

CONFIGS = Path(__file__).parents[1] / "configs"
README = Path(__file__).parents[1] / "README.md"

# --- the bandit: one prompt, one-token answers, Bradley–Terry preferences on a known reward -------------------

PROMPT = "q"
ANSWERS = ("a", "b", "c", "d")
REWARDS = torch.tensor([0.0, 0.5, 1.0, 2.0])


def write_bandit_policy(path: Path) -> str:
    """A tiny word-level tokenizer and a randomly initialised GPT-2 whose answer probabilities differ visibly."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, PROMPT: 3, **{answer: 4 + i for i, answer in enumerate(ANSWERS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=8, initializer_range=0.1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=1, bos_token_id=1, pad_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_bandit_pairs(path: Path, n_pairs: int, seed: int = 0) -> str:
    """Ordered pairs of distinct answers drawn uniformly (the sampling distribution μ of Azar et al. is uniform),
    the first preferred with probability σ(r(y) − r(y'))."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_pairs):
        first, second = rng.sample(range(len(ANSWERS)), 2)
        if rng.random() >= torch.sigmoid(REWARDS[first] - REWARDS[second]).item():
            first, second = second, first
        rows.append({"prompt": PROMPT, "chosen": ANSWERS[first], "rejected": ANSWERS[second]})
    return str(write_jsonl(path, rows))


@torch.no_grad()
def candidate_log_distribution(model, tokenizer) -> torch.Tensor:
    """log π(y) over the candidate answers, renormalised over them.

    π(y) is the probability of the whole response ``y <eos>``. The preference losses only see log-ratio
    differences between responses that occur in the data, so they pin π down on the candidate set up to one
    common factor: how much mass the network leaves outside it (other tokens, answers without EOS) is not
    identified by the objective. Renormalised over the candidates, both optima below are exact statements.
    """
    ids = [tokenizer.convert_tokens_to_ids([PROMPT, answer, tokenizer.eos_token]) for answer in ANSWERS]
    input_ids = torch.tensor(ids)
    response_mask = torch.tensor([[0, 1, 1]] * len(ANSWERS))
    token_logps, mask = model_token_logprobs(model.eval(), input_ids, torch.ones_like(input_ids), response_mask)
    return torch.log_softmax(losses.sequence_logprobs(token_logps, mask), dim=0)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    return float((log_p.exp() * (log_p - log_q)).sum())


def train_bandit(tmp_path: Path, loss_type: str, beta: float, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Train DPOModule on 4000 sampled pairs (ten epochs) → (log π_ref, log π) over the candidates."""
    policy_path = write_bandit_policy(tmp_path / "policy")
    data = ComparisonDataModule(
        path=write_bandit_pairs(tmp_path / "pairs.jsonl", 4000), tokenizer_name_or_path=policy_path,
        max_length=4, max_prompt_length=2, batch_size=400, val_fraction=0.0,
    )
    module = DPOModule(
        policy_path, loss_type=loss_type, beta=beta, optimizer=OptimizerConfig(learning_rate=0.05), max_prompt_length=2,
        export_dir=str(tmp_path / "export"),
    )
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    tokenizer = load_tokenizer(policy_path)
    reference = load_causal_lm(policy_path, tokenizer)
    return candidate_log_distribution(reference, tokenizer), candidate_log_distribution(module.model, tokenizer)


def test_bandit_dpo_converges_to_the_kl_regularised_optimum(tmp_path):
    beta = 1.0
    log_ref, log_policy = train_bandit(tmp_path, "sigmoid", beta)
    # Rafailov et al. 2023, eq. 4: π*(y) ∝ π_ref(y)·exp(r(y)/β).
    log_optimum = torch.log_softmax(log_ref + REWARDS / beta, dim=0)
    assert log_ref.exp().max() > 1.5 * log_ref.exp().min(), "the reference should not be uniform"
    assert kl(log_ref, log_optimum) > 0.2, "the optimum should be far from the start"
    assert kl(log_policy, log_optimum) < 0.02, (log_policy.exp(), log_optimum.exp())


def test_bandit_dpo_module_with_ipo_loss_converges_to_the_ipo_optimum(tmp_path):
    tau = 0.25
    log_ref, log_policy = train_bandit(tmp_path, "ipo", tau)
    # Azar et al. 2023, §5.1: IPO is ΨPO with Ψ the identity, and its loss is minimised by the ΨPO optimum
    #     π*(y) ∝ π_ref(y)·exp(τ⁻¹·p*(y ≻ μ)),   p*(y ≻ μ) = E_{y'∼μ}[p*(y ≻ y')],
    # the probability that y beats a response drawn from the data's sampling distribution μ (uniform here; the
    # pairs y = y' we never draw would only add ½/K to every p*(y ≻ μ)). Why: with p = p*(y ≻ y') and h the
    # log-ratio difference, a pair's expected loss p·(h − 1/(2τ))² + (1 − p)·(h + 1/(2τ))² is least at
    # h = (p − ½)/τ, and least squares over differences h = g(y) − g(y') of log-ratios g give g(y) = p*(y ≻ μ)/τ
    # plus a constant.
    # Not the DPO optimum: IPO regresses onto bounded preference probabilities, not onto rewards.
    win_probability = torch.sigmoid(REWARDS[:, None] - REWARDS[None, :]).mean(dim=1)
    log_ipo_optimum = torch.log_softmax(log_ref + win_probability / tau, dim=0)
    log_dpo_optimum = torch.log_softmax(log_ref + REWARDS / tau, dim=0)
    assert kl(log_ipo_optimum, log_dpo_optimum) > 0.5
    assert kl(log_policy, log_ipo_optimum) < 0.02, (log_policy.exp(), log_ipo_optimum.exp())


# --- the world: SFT → the raters rank SFT samples → DPO ---------------------------------------------------------


def mean_gold_reward(policy_path: str, world_dir: Path, seeds: int = 16) -> float:
    """Gold reward on the world's first 64 development prompts, averaged over several sampling seeds (one seed's
    standard error is about 0.09 on this SFT policy, too coarse to compare two policies)."""
    prompts = [json.loads(line)["prompt"] for line in (world_dir / "dev_prompts.jsonl").read_text().splitlines()][:64]
    tokenizer = load_tokenizer(policy_path)
    model = load_causal_lm(policy_path, tokenizer)
    evaluations = [
        evaluate_policy(model, tokenizer, prompts, SamplingConfig(), max_prompt_length=32, seed=seed,
                        gold=gold_scorer(prompts))
        for seed in range(seeds)
    ]
    return sum(evaluation.metrics["gold/reward"] for evaluation in evaluations) / seeds


def test_dpo_on_rater_comparisons_of_sft_samples_raises_gold_reward(world_sft_path, world_cache, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The documented recipe: collect writes runs/collect/comparisons.jsonl, which configs/dpo.yaml reads.
    run_cli("collect", "--policy", world_sft_path, "--num-prompts", "2000", "--k", "4")
    run_cli("fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.model_name_or_path", world_sft_path)
    run = latest_run(tmp_path, "dpo")
    # One validation before training (the SFT policy, its own reference), then after steps 150 and 300.
    assert metric_series(run, "eval/objective/kl")[0] == pytest.approx(0.0, abs=1e-5)
    assert 0.2 < metric_series(run, "eval/objective/kl")[-1] < 10, "DPO should move away from SFT, on a leash"
    assert metric_series(run, "val/rewards/accuracies")[-1] > 0.55
    assert metric_series(run, "val/rewards/margins")[-1] > 0.02  # 0.03–0.08 over the main job's seeds
    sft_gold = mean_gold_reward(world_sft_path, world_cache / "world")
    dpo_gold = mean_gold_reward(str(tmp_path / "runs" / "dpo" / "hf"), world_cache / "world")
    assert dpo_gold > sft_gold + 0.05, (sft_gold, dpo_gold)


# --- hand-worked losses through the module ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bandit_policy_path(tmp_path_factory):
    return write_bandit_policy(tmp_path_factory.mktemp("bandit-policy"))


def bandit_ids(tokenizer, *words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(words))


def pair_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict:
    """A comparison batch from the data layer's collate function: prompt "q", one-answer responses + EOS."""
    examples = [
        {"prompt_ids": bandit_ids(tokenizer, PROMPT), "chosen_ids": bandit_ids(tokenizer, chosen, "<eos>"),
         "rejected_ids": bandit_ids(tokenizer, rejected, "<eos>"), "margin": None,
         "prompt": PROMPT, "chosen": chosen, "rejected": rejected}
        for chosen, rejected in pairs
    ]
    return collate_comparisons(examples, pad_id=tokenizer.pad_token_id)


@torch.no_grad()
def answer_token_logps(model, tokenizer, answer: str) -> torch.Tensor:
    """log π(answer | q) and log π(<eos> | q answer) straight from the logits, independently of the module."""
    ids = torch.tensor([bandit_ids(tokenizer, PROMPT, answer, "<eos>")])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    return log_probs[torch.arange(2), ids[0, 1:]]


def module_at_start(policy_path: str, kind: type[PreferenceModule] = DPOModule, **hparams) -> PreferenceModule:
    module = kind(model_name_or_path=policy_path, max_prompt_length=2, **hparams)
    module.configure_model()
    return module


# At the start the policy is the reference, so every log-ratio is 0: Δ = 0 and all implicit rewards are 0.
@pytest.mark.parametrize(
    "hparams, expected_loss",
    [
        ({"loss_type": "sigmoid"}, math.log(2)),  # −log σ(0)
        ({"loss_type": "sigmoid", "label_smoothing": 0.2}, math.log(2)),  # −0.8·log σ(0) − 0.2·log σ(0)
        ({"loss_type": "robust", "label_smoothing": 0.2}, math.log(2)),  # (0.8 − 0.2)·log 2 / (1 − 0.4)
        ({"loss_type": "hinge", "beta": 0.5}, 1.0),  # max(0, 1 − β·0)
        ({"loss_type": "ipo", "beta": 0.25}, 4.0),  # (0 − 1/(2·0.25))²
        ({"loss_type": "sigmoid", "length_normalized": True}, math.log(2)),
    ],
)
def test_paired_losses_at_the_start_are_hand_worked_values(bandit_policy_path, hparams, expected_loss):
    module = module_at_start(bandit_policy_path, **hparams)
    loss, metrics = module._step(pair_batch(module.tokenizer, [("a", "b"), ("d", "c")]))
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name][0].item() == pytest.approx(0.0, abs=1e-6), name
    assert metrics["lengths/chosen_minus_rejected"][0].item() == 0.0
    chosen_logps = [answer_token_logps(module.model, module.tokenizer, answer) for answer in ("a", "d")]
    reduce = torch.mean if hparams.get("length_normalized") else torch.sum
    expected_chosen = sum(reduce(logps) for logps in chosen_logps) / 2
    assert metrics["logps/chosen"][0].item() == pytest.approx(expected_chosen.item(), abs=1e-5)


def test_simpo_loss_uses_length_averaged_logps_and_the_margin(bandit_policy_path):
    module = module_at_start(bandit_policy_path, loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert module.reference is None, "SimPO has no reference model"
    loss, metrics = module._step(pair_batch(module.tokenizer, [("a", "b")]))
    chosen = answer_token_logps(module.model, module.tokenizer, "a").mean()
    rejected = answer_token_logps(module.model, module.tokenizer, "b").mean()
    expected = math.log1p(math.exp(-(2.0 * (chosen - rejected).item() - 0.5)))  # −log σ(β(c − r) − γ)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["rewards/margins"][0].item() == pytest.approx(2.0 * (chosen - rejected).item(), abs=1e-5)


def test_rpo_alpha_adds_the_chosen_nll_per_token(bandit_policy_path):
    module = module_at_start(bandit_policy_path, rpo_alpha=0.5)
    loss, _ = module._step(pair_batch(module.tokenizer, [("a", "b"), ("c", "d")]))
    chosen_tokens = torch.cat([answer_token_logps(module.model, module.tokenizer, answer) for answer in ("a", "c")])
    assert loss.item() == pytest.approx(math.log(2) - 0.5 * chosen_tokens.mean().item(), abs=1e-5)


def test_kto_at_the_start_costs_half_of_each_rows_weight(bandit_policy_path):
    module = module_at_start(bandit_policy_path, KTOModule, desirable_weight=1.0, undesirable_weight=2.0)
    module.trainer = L.Trainer(logger=False, enable_progress_bar=False)  # the KL estimate is gathered across devices
    tokenizer = module.tokenizer
    examples = [
        {"prompt_ids": bandit_ids(tokenizer, PROMPT), "response_ids": bandit_ids(tokenizer, answer, "<eos>"),
         "label": label, "prompt": PROMPT, "completion": answer}
        for answer, label in [("a", True), ("b", False), ("d", True)]
    ]
    loss, metrics = module._step(collate_unpaired(examples, pad_id=tokenizer.pad_token_id, max_length=4))
    # r = 0 and the KL reference point z = 0: each row costs λ·(1 − σ(0)) = λ/2 → (0.5 + 1.0 + 0.5) / 3.
    assert loss.item() == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["kl"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/chosen"][1] == 2 and metrics["rewards/rejected"][1] == 1
    assert "rewards/accuracies" not in metrics


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({"loss_type": "dpo"}, "unknown loss_type"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
        ({"model_name_or_path": "world"}, "SFT export"),
        ({"beta": -1.0}, "beta must be positive, got -1.0"),
        ({"beta": 0.0}, "beta must be positive, got 0.0"),
        ({"optimizer": {"learning_rate": 0.0}}, "optimizer.learning_rate must be positive"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label-flip probability below 0.5, got 0.5"),
        ({"sampling": {"temperature": -1.0}}, "temperature and top_k not negative"),
    ],
)
def test_bad_settings_fail_at_construction(bandit_policy_path, hparams, message):
    with pytest.raises(ConfigError, match=message):
        DPOModule(**{"model_name_or_path": bandit_policy_path, **hparams})


def test_kto_has_no_precomputed_reference_logps_and_dpo_points_kto_to_its_module(bandit_policy_path):
    with pytest.raises(TypeError, match="precompute_ref_logps"):  # its KL pairs are formed per batch
        KTOModule(model_name_or_path=bandit_policy_path, precompute_ref_logps=True)
    with pytest.raises(ConfigError, match="KTO, on unpaired rows, is KTOModule: configs/kto.yaml"):
        DPOModule(model_name_or_path=bandit_policy_path, loss_type="kto")


# --- precomputed reference log-probs ---------------------------------------------------------------------------


class LossRecorder(L.Callback):
    """Training losses, and whether a reference model was in memory at each training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.reference_in_memory: list[bool] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.reference_in_memory.append(module.reference is not None)


@pytest.fixture
def small_world_comparisons(world_cache, world_sft_path, tmp_path) -> str:
    """The first 96 of the world's rater comparisons, as a file (so the precomputed pass is quick)."""
    from lit_rlhf.world import ensure_world

    lines = ensure_world(world_cache / "world")["comparisons"].read_text().splitlines()[:96]
    return str(write_jsonl(tmp_path / "comparisons.jsonl", [json.loads(line) for line in lines]))


def fit_few_steps(policy_path: str, data_path: str, root: Path, **hparams) -> tuple[DPOModule, LossRecorder]:
    L.seed_everything(0)
    module = DPOModule(policy_path, optimizer=OptimizerConfig(learning_rate=1e-3), sampling=SamplingConfig(8),
                       export_dir=str(root / "export"), **hparams)
    data = ComparisonDataModule(path=data_path, tokenizer_name_or_path=policy_path, batch_size=16,
                                val_fraction=0.25, num_eval_prompts=4)
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=4, val_check_interval=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[recorder])
    trainer.fit(module, data)
    module.logged = {name: value.item() for name, value in trainer.callback_metrics.items()}
    return module, recorder


def test_precomputed_reference_logps_give_the_live_reference_losses(world_sft_path, small_world_comparisons, tmp_path):
    live, live_run = fit_few_steps(world_sft_path, small_world_comparisons, tmp_path / "live")
    cache = tmp_path / "ref_logps.pt"
    pre, pre_run = fit_few_steps(world_sft_path, small_world_comparisons, tmp_path / "pre",
                                 precompute_ref_logps=True, ref_logps_cache=str(cache))
    assert live_run.reference_in_memory == [True] * 4
    assert pre_run.reference_in_memory == [False] * 4, "the reference must be out of memory while training"
    assert pre_run.losses == pytest.approx(live_run.losses, abs=1e-5)
    assert live_run.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
    for name in ("val/loss", "val/rewards/margins", "val/logps/chosen", "eval/objective/kl",
                 "eval/response/length_drift"):
        assert pre.logged[name] == pytest.approx(live.logged[name], abs=1e-4), name
    assert pre.logged["eval/objective/kl"] > 0
    assert cache.exists()


def test_sharing_prompts_trains_as_whole_sequences_do(world_sft_path, small_world_comparisons, tmp_path, monkeypatch):
    from lit_rlhf.phases import dpo_logprobs

    shared_forwards = []
    counted = dpo_logprobs.shared_prompt_logprobs
    monkeypatch.setattr(dpo_logprobs, "shared_prompt_logprobs",
                        lambda model, shared: shared_forwards.append(len(shared.prompt_ids)) or counted(model, shared))
    shared, shared_run = fit_few_steps(world_sft_path, small_world_comparisons, tmp_path / "shared")
    shared_count = len(shared_forwards)
    whole, whole_run = fit_few_steps(world_sft_path, small_world_comparisons, tmp_path / "whole", share_prompts=False)
    # Policy and reference on every batch: 2 × (4 steps + 2 validation batches, run twice with the sanity check).
    assert shared_count == 16 and len(shared_forwards) == shared_count
    assert shared_run.losses == pytest.approx(whole_run.losses, abs=1e-5)
    for name in ("val/loss", "val/rewards/margins", "val/logps/chosen", "val/logps/rejected"):
        assert shared.logged[name] == pytest.approx(whole.logged[name], abs=1e-4), name


def test_reference_logps_cache_is_reused_and_invalidated(world_sft_path, small_world_comparisons, tmp_path,
                                                         monkeypatch):
    reference_path = shutil.copytree(world_sft_path, tmp_path / "sft")  # a copy, to rewrite it below
    loads = []
    load_reference = DPOModule._load_reference
    monkeypatch.setattr(DPOModule, "_load_reference", lambda self: loads.append(1) or load_reference(self))
    cache = str(tmp_path / "ref_logps.pt")

    def reference_loads_to_precompute(data_path: str) -> int:
        loads.clear()
        module = DPOModule(str(reference_path), precompute_ref_logps=True, ref_logps_cache=cache)
        data = ComparisonDataModule(path=data_path, tokenizer_name_or_path=str(reference_path), val_fraction=0.25)
        trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, data)
        return len(loads)

    assert reference_loads_to_precompute(small_world_comparisons) == 1  # computed once, then freed
    assert reference_loads_to_precompute(small_world_comparisons) == 0  # same reference and data: from the file
    rows = Path(small_world_comparisons).read_text().splitlines()
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(rows[:80] + [rows[80].replace('"chosen": "', '"chosen": "really ')]) + "\n")
    assert reference_loads_to_precompute(str(changed)) == 1  # a changed row misses the cache
    assert reference_loads_to_precompute(str(changed)) == 0
    config = reference_path / "config.json"
    config.write_text(config.read_text() + "\n")  # the reference changed on disk
    assert reference_loads_to_precompute(str(changed)) == 1


def test_checkpoints_leave_out_the_reference_and_reload(world_sft_path, small_world_comparisons, tmp_path):
    L.seed_everything(0)
    module = DPOModule(world_sft_path, export_dir=str(tmp_path / "export"))
    data = ComparisonDataModule(path=small_world_comparisons, tokenizer_name_or_path=world_sft_path, batch_size=16)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    checkpoint_path = next(tmp_path.rglob("*.ckpt"))
    state_dict = torch.load(checkpoint_path, weights_only=False)["state_dict"]
    assert state_dict and not any(key.startswith("reference.") for key in state_dict)
    assert not any(p.requires_grad for p in module.reference.parameters()) and not module.reference.training
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    reloaded = DPOModule.load_from_checkpoint(checkpoint_path)
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(reloaded.model.state_dict()[name], value)


# --- configs through the command line ----------------------------------------------------------------------------

PAIRED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected", "lengths/chosen_minus_rejected")
GENERATION_METRICS = ("eval/objective/kl", "eval/response/length_mean", "eval/response/length_drift",
                      "eval/gold/reward", "eval/hacking/length_ratio", "eval/hacking/sycophancy_rate",
                      "eval/hacking/format_rate", "eval/hacking/repetition_rate")


@pytest.mark.parametrize("config", ["dpo.yaml", "ipo.yaml", "simpo.yaml", "kto.yaml"])
def test_config_runs_a_step_and_logs_the_ecosystem_metrics(world_sft_path, tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    run_cli(
        "fit", "--config", str(CONFIGS / config), "--model.model_name_or_path", world_sft_path, "--data.path", "null",
        "--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "2",
        "--data.num_eval_prompts", "8",
    )
    name = config.removesuffix(".yaml")
    run = latest_run(tmp_path, name)  # logs next to the export, runs/<loss type>/
    logged = metric_rows(run)[0].keys()
    paired = config != "kto.yaml"
    expected = {*GENERATION_METRICS, "train/loss", "val/loss"}
    expected |= {*PAIRED_METRICS, *(f"val/{name}" for name in PAIRED_METRICS)} if paired else {"kl", "val/kl"}
    assert expected <= set(logged), expected - set(logged)
    # The first validation is the untrained policy: it is its own reference.
    assert metric_series(run, "eval/objective/kl")[0] == pytest.approx(0.0, abs=1e-5)
    assert metric_series(run, "eval/response/length_drift")[0] == 0.0
    assert metric_series(run, "eval/hacking/length_ratio")[0] == 1.0
    assert (tmp_path / "runs" / name / "hf" / "config.json").exists()


def test_a_registered_loss_runs_from_the_command_line(world_sft_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(
        "fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.loss_type", "nca", "--model.model_name_or_path",
        world_sft_path, "--data.path", "null", "--trainer.max_steps", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "1", "--data.num_eval_prompts", "4", "--model.export_dir", "runs/nca/hf",
    )
    # The first step's policy is its reference: r_c = r_r = 0 and NCA costs ln 2 + ½·ln 2 + ½·ln 2 = 2·ln 2.
    assert metric_series(latest_run(tmp_path, "nca"), "train/loss")[0] == pytest.approx(2 * math.log(2), abs=1e-5)


def test_an_unknown_loss_type_is_one_line_naming_the_registered_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.loss_type", "nope"])
    assert exit_info.value.code == 2
    expected = (f"lit-rlhf: error: unknown loss_type 'nope'; expected one of {', '.join(loss_types())} (KTO, on "
                "unpaired rows, is KTOModule: configs/kto.yaml)")
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert "nca" in loss_types() and "kto" not in loss_types()


def test_the_readme_lists_every_loss_type():
    listed = README.read_text().split("### DPO and its relatives")[1].split("\n## ")[0]
    for name in loss_types():
        assert f"| `{name}` |" in listed, name
