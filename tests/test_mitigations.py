"""Reward-hacking mitigations: an ensemble's combination rules and the score transforms, against hand computation."""

import math
from pathlib import Path

import pytest
import torch

from lit_rlhf.advantages import cap_scores, combine_ensemble, transform_scores

MEMBERS = torch.tensor([[1.0, -1.0, 0.5],
                        [3.0, -1.0, 0.5],
                        [2.0, 2.0, 0.5]])
"""Three members' scores of three answers: they agree on the third, disagree most on the second."""


def test_the_ensemble_rules_by_hand():
    assert combine_ensemble(MEMBERS, "mean").tolist() == [2.0, 0.0, 0.5]
    assert combine_ensemble(MEMBERS, "worst_case").tolist() == [1.0, -1.0, 0.5]
    # variances over members, 1/K: (1 + 1 + 0)/3 = 2/3; (1 + 1 + 4)/3 = 2; 0
    uncertain = combine_ensemble(MEMBERS, "uncertainty", uncertainty_penalty=0.5)
    assert uncertain.tolist() == pytest.approx([2.0 - 0.5 * 2 / 3, 0.0 - 0.5 * 2.0, 0.5])
    assert combine_ensemble(MEMBERS[:1], "uncertainty").tolist() == MEMBERS[0].tolist()  # one member: no doubt
    with pytest.raises(ValueError, match="unknown ensemble rule 'median'"):
        combine_ensemble(MEMBERS, "median")


def test_the_score_transforms_by_hand():
    scores, reference = torch.tensor([0.0, 2.0, -3.0]), torch.tensor([0.0, 1.0, -1.0])
    assert transform_scores(scores, reference, "none").tolist() == scores.tolist()
    expected = [1 / (1 + math.exp(-d)) for d in (0.0, 1.0, -2.0)]
    assert transform_scores(scores, reference, "preference").tolist() == pytest.approx(expected)
    assert transform_scores(scores, reference, "log_sigmoid").tolist() == pytest.approx([math.log(p) for p in expected])
    # log σ is steep below the reference and flat above: one unit up from -2 gains more than one unit up from +2
    low, low_up, high, high_up = transform_scores(torch.tensor([-2.0, -1.0, 2.0, 3.0]), torch.zeros(4),
                                                  "log_sigmoid").tolist()
    assert low_up - low > high_up - high > 0
    with pytest.raises(ValueError, match="unknown score transform"):
        transform_scores(scores, reference, "exp")


def test_a_cap_bounds_scores_from_above_only():
    assert cap_scores(torch.tensor([-5.0, 0.5, 4.0]), 1.0).tolist() == [-5.0, 0.5, 1.0]
    assert cap_scores(torch.tensor([4.0]), None).tolist() == [4.0]


# --- reward models made from reward models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_rm_path(world_sft_path, tmp_path_factory):
    """Another reward model from the same SFT export, its head drawn under another seed: a second member."""
    from lit_rlhf.models import export, load_scalar_head_model, load_tokenizer

    torch.manual_seed(1)
    tokenizer = load_tokenizer(world_sft_path)
    model = load_scalar_head_model(world_sft_path, tokenizer)
    model.config.lit_rlhf_score_mean, model.config.lit_rlhf_score_std = 0.5, 2.0
    return str(export(model, tokenizer, tmp_path_factory.mktemp("second-rm")))


ANSWERS = (["name three fruits ."] * 3, ["apple , pear , plum .", "apple .", "red , blue ."], [True, True, False])


def test_an_ensemble_folder_loads_as_a_reward_model_and_combines_its_normalised_members(
        world_rm_path, second_rm_path, tmp_path):
    from lit_rlhf.scoring import EnsembleScorer, RewardModelScorer, make_scorer, write_ensemble

    members = [RewardModelScorer.from_pretrained(path, normalize=True) for path in (world_rm_path, second_rm_path)]
    each = torch.stack([member.score(*ANSWERS) for member in members])
    raw_second = RewardModelScorer.from_pretrained(second_rm_path).score(*ANSWERS)
    assert each[1].tolist() == pytest.approx(((raw_second - 0.5) / 2.0).tolist())  # normalised by its own statistics
    for rule, expected in (("mean", each.mean(0)), ("worst_case", each.min(0).values),
                           ("uncertainty", each.mean(0) - 0.5 * each.var(0, unbiased=False))):
        folder = write_ensemble(tmp_path / rule, [world_rm_path, second_rm_path], rule, uncertainty_penalty=0.5)
        scorer = make_scorer(str(folder), normalize=False)  # an ensemble's members are normalised regardless
        assert isinstance(scorer, EnsembleScorer) and scorer.statistics == (0.0, 1.0)
        assert scorer.score(*ANSWERS).tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        assert len(scorer.networks) == 2


def test_warms_weights_are_the_mean_of_the_members(world_rm_path, second_rm_path):
    from lit_rlhf.reward_models import average_weights, load_reward_model

    first, second = load_reward_model(world_rm_path), load_reward_model(second_rm_path)
    averaged = average_weights([first, second])
    for name, weight in first.state_dict().items():
        mean = (weight.double() + second.state_dict()[name].double()) / 2
        assert torch.equal(averaged[name], mean.to(weight.dtype))
    assert not torch.equal(averaged["score.weight"], first.state_dict()["score.weight"])  # the heads differed


def test_the_length_slope_by_hand_and_a_corrected_scorer_subtracts_it(world_rm_path):
    from lit_rlhf.reward_models import length_slope
    from lit_rlhf.scoring import LENGTH_SLOPE_KEY, RewardModelScorer

    # scores 1, 2, 6 at lengths 1, 2, 3: about the means 3 and 2, cov = (−2·−1 + −1·0 + 3·1)/3 = 5/3, var = 2/3
    assert length_slope(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([1, 2, 3])) == pytest.approx(2.5)
    assert length_slope(torch.tensor([1.0, 2.0]), torch.tensor([4, 4])) == 0.0
    scorer = RewardModelScorer.from_pretrained(world_rm_path)
    raw = scorer.score(*ANSWERS)
    lengths = torch.tensor(scorer.response_lengths(ANSWERS[1]), dtype=torch.float32)
    assert lengths.tolist() == [6.0, 2.0, 4.0]  # words and commas: the world's tokens
    setattr(scorer.model.config, LENGTH_SLOPE_KEY, 0.25)
    assert scorer.score(*ANSWERS).tolist() == pytest.approx((raw - 0.25 * lengths).tolist())


@pytest.mark.slow
def test_the_reward_model_stages_write_exports_that_score(world_sft_path, world_rm_path, second_rm_path, tmp_path):
    """An ensemble, WARM and the post-hoc length fix as pipeline stages: each writes a reward model that loads by
    path; the length-corrected one's scores no longer correlate linearly with length on the policy's answers."""
    import yaml

    from lit_rlhf import stage_runners
    from lit_rlhf.cli import fit_phase
    from lit_rlhf.generation import SamplingConfig
    from lit_rlhf.losses import pearson_correlation
    from lit_rlhf.pipeline import run_stages
    from lit_rlhf.pipeline_run import start_run
    from lit_rlhf.reward_models import length_slope, policy_answers
    from lit_rlhf.scoring import make_scorer

    file = tmp_path / "pipeline.yaml"
    members = [world_rm_path, second_rm_path]
    file.write_text(yaml.safe_dump({"stages": [
        {"name": "worst", "kind": "ensemble", "members": members, "rule": "worst_case"},
        {"name": "warm", "kind": "weight_average", "members": members, "statistics_policy": world_sft_path,
         "normalization_samples": 64},
        {"name": "fair", "kind": "length_corrected", "reward_model": world_rm_path,
         "statistics_policy": world_sft_path, "normalization_samples": 64},
    ]}))
    run = start_run(file, fit_phase, tmp_path / "out")
    run_stages(run)
    done = {name: run.done(name) for name in ("worst", "warm", "fair")}
    assert done["worst"]["model"] == "ensemble" and done["warm"]["role"] == done["fair"]["role"] == "reward_model"
    torch.manual_seed(0)  # the answers the stages measured on: the first 64 training prompts' SFT answers
    answers = policy_answers(world_sft_path, stage_runners._reward_model_prompts(run, world_sft_path), 64,
                             SamplingConfig(), 32)
    for name in ("worst", "warm", "fair"):
        scores = make_scorer(run.resolve(name, "model"), normalize=True).score(*answers)
        assert scores.shape == (64,) and torch.isfinite(scores).all()
        if name != "worst":  # normalised with the statistics measured on these very answers
            assert (scores.mean().item(), scores.std().item()) == pytest.approx((0.0, 1.0), abs=1e-4)
    fair = make_scorer(run.resolve("fair", "model"))
    lengths = torch.tensor(fair.response_lengths(answers[1]), dtype=torch.float32)
    original = make_scorer(world_rm_path).score(*answers)
    assert abs(float(pearson_correlation(original, lengths))) > 0.05  # there was a length trend to remove
    assert float(pearson_correlation(fair.score(*answers), lengths)) == pytest.approx(0.0, abs=1e-4)  # least squares
    assert done["fair"]["length_slope"] == pytest.approx(length_slope(original, lengths), rel=1e-4)


# --- ODIN: a length head beside the quality head ---------------------------------------------------------------


def _fit_heads(odin: bool) -> tuple[float, float]:
    """Linear heads on fixed features of 512 answers whose raters prefer quality and, as much, length: with ODIN a
    quality head and a length head trained on their sum, else one head. Returns the quality (or only) head's
    correlation with length and its accuracy on the true quality order."""
    from lit_rlhf.losses import bradley_terry_loss, odin_penalty, pearson_correlation

    generator = torch.Generator().manual_seed(0)
    length = torch.randint(1, 21, (512,), generator=generator).float()
    quality = torch.randn(512, generator=generator)
    features = torch.cat([((length - length.mean()) / length.std())[:, None], quality[:, None],
                          torch.randn(512, 6, generator=generator)], dim=1)
    rated = quality + (length - length.mean()) / length.std()  # what the biased raters compare
    first, second = torch.arange(0, 512, 2), torch.arange(1, 512, 2)
    chosen = torch.where(rated[first] > rated[second], first, second)
    rejected = torch.where(rated[first] > rated[second], second, first)
    torch.manual_seed(0)
    quality_head, length_head = torch.nn.Linear(8, 1, bias=False), torch.nn.Linear(8, 1, bias=False)
    optimizer = torch.optim.Adam([*quality_head.parameters(), *length_head.parameters()], lr=0.05)
    for _ in range(300):
        r_quality, r_length = quality_head(features).squeeze(-1), length_head(features).squeeze(-1)
        total = r_quality + r_length if odin else r_quality
        loss = bradley_terry_loss(total[chosen], total[rejected]).mean()
        if odin:
            loss = loss + odin_penalty(r_quality, r_length, length, quality_head.weight, length_head.weight, 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    r_quality = quality_head(features).squeeze(-1).detach()
    true_order = (r_quality[first] > r_quality[second]) == (quality[first] > quality[second])
    return float(pearson_correlation(r_quality, length)), true_order.float().mean().item()


def test_odins_penalty_takes_length_out_of_the_quality_head_on_a_constructed_set():
    """The raters reward length as much as quality: one head learns both (correlation with length about 0.7); with
    ODIN the quality head's correlation with length goes to about 0 and it orders answers by quality better."""
    single_corr, single_accuracy = _fit_heads(odin=False)
    odin_corr, odin_accuracy = _fit_heads(odin=True)
    assert single_corr > 0.5
    assert abs(odin_corr) < 0.05
    assert odin_accuracy > single_accuracy + 0.05


def test_odin_by_hand():
    from lit_rlhf.losses import odin_length_loss, odin_orthogonality_loss, odin_penalty, pearson_correlation

    lengths = torch.tensor([1.0, 2.0, 3.0])
    assert float(pearson_correlation(torch.tensor([2.0, 4.0, 6.0]), lengths)) == pytest.approx(1.0)
    assert float(pearson_correlation(torch.tensor([5.0, 5.0, 5.0]), lengths)) == 0.0
    # quality perfectly anti-correlated (|ρ| = 1), length head perfectly correlated (ρ = 1): 1 − 1 = 0
    assert float(odin_length_loss(-lengths, lengths, lengths)) == pytest.approx(0.0, abs=1e-6)
    # quality uncorrelated ([1, 0, 1]: ρ = 0), length head anti-correlated: 0 − (−1) = 1
    assert float(odin_length_loss(torch.tensor([1.0, 0.0, 1.0]), -lengths, lengths)) == pytest.approx(1.0)
    assert float(odin_orthogonality_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -4.0]]))) == 5.0
    # λ_L·1 + λ_O·5 with the second case and those weights: 0.5 + 0.2·5 = 1.5
    penalty = odin_penalty(torch.tensor([1.0, 0.0, 1.0]), -lengths, lengths, torch.tensor([[1.0, 2.0]]),
                           torch.tensor([[3.0, -4.0]]), length_coef=0.5, orthogonality_coef=0.2)
    assert float(penalty) == pytest.approx(1.5)


def test_an_odin_reward_model_trains_two_heads_and_exports_the_quality_head(world_sft_path, tmp_path, monkeypatch):
    from helpers import latest_run, metric_series, run_cli
    from lit_rlhf.collect import collect_comparisons
    from lit_rlhf.generation import SamplingConfig
    from lit_rlhf.scoring import RewardModelScorer

    monkeypatch.chdir(tmp_path)
    collect_comparisons(world_sft_path, tmp_path / "collect", k=4, num_prompts=40, sampling=SamplingConfig(16))
    run_cli(
        "fit", "--config", str(Path(__file__).parents[1] / "configs" / "rm.yaml"),
        "--model.model_name_or_path", world_sft_path, "--model.export_dir", str(tmp_path / "rm"),
        "--model.normalization_samples", "16", "--model.odin.length_weight", "1.0",
        "--data.path", str(tmp_path / "collect" / "comparisons.jsonl"),
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
        "--data.max_length", "48", "--data.max_prompt_length", "24",
    )
    assert metric_series(latest_run(tmp_path, "reward"), "train/odin/length_head_corr")
    exported = RewardModelScorer.from_pretrained(tmp_path / "rm")
    assert exported.model.config.num_labels == 1 and exported.model.score.weight.shape[0] == 1
    assert torch.isfinite(exported.score(*ANSWERS)).all()


# --- PPO against an ensemble, its reward shaped ------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["preference", pytest.param("log_sigmoid", marks=pytest.mark.slow)])
def test_ppo_trains_against_an_ensemble_with_a_shaped_reward(world_sft_path, world_rm_path, second_rm_path, tmp_path,
                                                             transform):
    """Both members are registered frozen networks (left out of checkpoints); each rollout answer's score is
    σ(r − r_ref) or log σ(r − r_ref) against the reference policy's answer to its prompt, capped at 0.9."""
    from lightning.pytorch import Trainer, seed_everything

    from lit_rlhf.data.datamodules import PromptDataModule
    from lit_rlhf.generation import SamplingConfig
    from lit_rlhf.phases.ppo import PPOModule
    from lit_rlhf.phases.settings import RewardConfig, UpdateConfig
    from lit_rlhf.scoring import write_ensemble

    ensemble = write_ensemble(tmp_path / "ensemble", [world_rm_path, second_rm_path], "worst_case")
    seed_everything(0)
    module = PPOModule(model_name_or_path=world_sft_path, reward_model=str(ensemble), sampling=SamplingConfig(8),
                       update=UpdateConfig(epochs=1), reward=RewardConfig(transform=transform, cap=0.9, clip=None),
                       export_dir=str(tmp_path / "export"))
    scores = []
    original = module._scores
    module._scores = lambda *args: scores.append(original(*args)) or scores[-1]
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=PromptDataModule(tokenizer_name_or_path=world_sft_path, batch_size=8,
                                                    num_eval_prompts=8))
    assert len(module.reward_networks) == 2 and not any(p.requires_grad for p in module.reward_networks.parameters())
    assert module.critic is not None  # from the first member
    shaped = torch.cat(scores)
    assert shaped.max() <= 0.9
    if transform == "preference":
        assert shaped.min() > 0
    else:
        assert shaped.max() <= 0
