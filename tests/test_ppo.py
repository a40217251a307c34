"""PPO phase: the KL-regularised bandit optimum for each estimator, resume, PPO-ptx, reward sources, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from helpers import latest_run, metric_series, run_cli
from lit_rlhf.cli import RLHFCLI
from lit_rlhf.data.datamodules import DataReport, PromptDataModule
from lit_rlhf.errors import ConfigError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.kl_control import KLControlConfig
from lit_rlhf.models import export, load_tokenizer
from lit_rlhf.phases.ppo import PPOModule
from lit_rlhf.phases.ppo_health import HealthLimits, PPOHealth
from lit_rlhf.phases.settings import AdvantageConfig, OptimizerConfig, PTXConfig, RewardConfig, UpdateConfig

CONFIG = str(Path(__file__).parents[1] / "configs" / "ppo.yaml")

# --- the bandit: one prompt, one-token answers, a known reward --------------------------------------------------

BANDIT_VOCAB = ["<pad>", "<eos>", "q", "a", "b", "c", "d"]
BANDIT_REWARD = {"a": 1.0, "b": 0.5, "c": 0.0, "d": -0.5}
"""r(y) of each answer; the other tokens (the prompt word, and pad and EOS, which decode to "") get -1."""
BANDIT_BETA = 0.5


def bandit_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [BANDIT_REWARD.get(response, -1.0) for response in responses]


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: extra OpenMP threads only add overhead (and spin on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    """A tiny GPT-2 over the bandit vocabulary (its random init is a non-uniform π_ref) and a prompt file."""
    root = tmp_path_factory.mktemp("bandit")
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(BANDIT_VOCAB)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(BANDIT_VOCAB), n_embd=16, n_layer=1, n_head=2, n_positions=8, initializer_range=0.1,
        eos_token_id=1, bos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    export(AutoModelForCausalLM.from_config(config), tokenizer, root / "model")
    return root / "model"


def answer_distribution(model, tokenizer) -> torch.Tensor:
    """π(y | "q") over the whole vocabulary."""
    prompt = torch.tensor([[tokenizer.convert_tokens_to_ids("q")]])
    with torch.no_grad():
        return torch.softmax(model(prompt).logits[0, -1].float(), dim=-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return (p * (p / q).log()).sum().item()


@pytest.mark.parametrize(
    ("estimator", "prompts_per_iteration", "iterations"), [("gae", 64, 100), ("grpo", 16, 60), ("rloo", 16, 60)]
)
def test_bandit_ppo_reaches_kl_regularised_optimum(bandit, tmp_path, estimator, prompts_per_iteration, iterations):
    tokenizer = load_tokenizer(str(bandit))
    reference = answer_distribution(AutoModelForCausalLM.from_pretrained(bandit), tokenizer)
    rewards = torch.tensor(bandit_reward([], [tokenizer.decode([i], skip_special_tokens=True) for i in range(7)]))
    optimum = reference * torch.exp(rewards / BANDIT_BETA)  # π* ∝ π_ref·exp(r/β), Rafailov et al. 2023, eq. 4
    optimum /= optimum.sum()
    assert kl(reference, optimum) > 1.0  # the reference is far from the optimum: there is something to learn

    seed_everything(0)
    module = PPOModule(
        model_name_or_path=str(bandit), reward_model="test_ppo:bandit_reward",
        advantage=AdvantageConfig(estimator, group_size=8), sampling=SamplingConfig(1),
        kl_control=KLControlConfig(BANDIT_BETA), optimizer=OptimizerConfig(0.01), update=UpdateConfig(epochs=2),
        max_prompt_length=4,
        export_dir=str(tmp_path / "export"),
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((json.dumps({"prompt": "q"}) + "\n") * prompts_per_iteration)
    data = PromptDataModule(
        path=str(prompts), tokenizer_name_or_path=str(bandit), max_length=8, max_prompt_length=4,
        batch_size=prompts_per_iteration, val_fraction=0.0,
    )
    trainer = Trainer(
        max_steps=iterations * 2, max_epochs=-1, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=data)

    assert module.iteration == iterations
    policy = answer_distribution(module.policy, tokenizer)
    assert kl(policy, optimum) < 0.02, (estimator, policy.tolist(), optimum.tolist())


# --- the world: the CLI, resume, critic-free estimators with PPO-ptx ---------------------------------------------

PER_ITERATION_METRICS = [
    "objective/scores", "objective/kl", "objective/rlhf_reward", "objective/non_score_reward", "objective/entropy",
    "policy/clipfrac", "policy/approxkl", "loss/policy", "loss/value", "value/clipfrac", "value/explained_variance",
    "kl/beta", "rollout/response/length_mean", "rollout/response/length_drift", "rollout/response/eos_fraction",
    "rollout/gold/reward",
]
EVAL_METRICS = [
    "eval/response/length_mean", "eval/response/length_drift", "eval/response/eos_fraction", "eval/gold/reward",
    "eval/proxy/reward", "eval/objective/kl", "eval/gold/proxy_gap", "eval/hacking/length_ratio",
    "eval/hacking/sycophancy_rate", "eval/hacking/format_rate", "eval/hacking/repetition_rate",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_ppo_cli_on_world_logs_every_iteration_and_exports(in_tmp, world_sft_path, world_rm_path):
    run_cli(
        "fit", "--config", CONFIG, "--model.model_name_or_path", world_sft_path, "--model.reward_model", world_rm_path,
        "--model.update.epochs", "1", "--model.update.num_minibatches", "2",
        "--model.log_samples_every_n_iterations", "2",
        "--data.batch_size", "8", "--data.num_eval_prompts", "8", "--model.optimizer.learning_rate", "1e-3",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
    )
    run = latest_run(in_tmp, "ppo")
    for name in PER_ITERATION_METRICS:
        assert len(metric_series(run, name)) == 3, name  # 6 updates = 3 iterations of 2 minibatches
    for name in EVAL_METRICS:
        assert len(metric_series(run, name)) == 2, name  # before training, and after iteration 3
    assert metric_series(run, "eval/response/length_drift")[0] == 0.0  # the untrained policy is the reference
    assert metric_series(run, "eval/hacking/length_ratio")[0] == 1.0
    assert metric_series(run, "eval/gold/proxy_gap")[0] == pytest.approx(0.0, abs=1e-9)
    assert metric_series(run, "eval/objective/kl")[0] == pytest.approx(0.0, abs=1e-5)
    assert metric_series(run, "eval/objective/kl")[1] > 0.0
    assert metric_series(run, "objective/kl")[0] == pytest.approx(0.0, abs=1e-4)  # first rollout: π = π_ref
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [sample["iteration"] for sample in samples] == [0] * 8 + [2] * 8
    assert set(samples[0]) == {"iteration", "prompt", "response", "score", "gold"}
    exported = AutoModelForCausalLM.from_pretrained(in_tmp / "runs" / "ppo" / "hf")
    assert exported.config.model_type == "gpt2"


def test_the_progress_bar_counts_iterations_to_the_end(tmp_path, world_sft_path):
    """``max_steps`` counts optimiser updates, update.epochs × num_minibatches = 8 an iteration: 16 are two
    iterations, which the bar shows done (not stopped at 2/16), in the one epoch they take (not ``Epoch 0/-2``)."""
    cli = RLHFCLI(args=[
        "fit", "--config", CONFIG, "--model.model_name_or_path", world_sft_path, "--model.reward_model", "gold",
        "--model.sampling.max_new_tokens", "4", "--data.batch_size", "4", "--data.num_eval_prompts", "2",
        "--trainer.max_steps", "16", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path), "--model.export_dir", str(tmp_path / "hf"),
    ])
    bar = cli.trainer.progress_bar_callback.train_progress_bar
    assert (bar.n, bar.total) == (2, 2)
    assert bar.desc.startswith("Epoch 0/0")


class IterationMetrics(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({name: float(value) for name, value in trainer.callback_metrics.items()})


def fit_world(tmp_path, sft: str, reward: str, iterations: int, updates_per_iteration: int, ckpt_path=None,
              callbacks=(), precision: str = "32-true", logger=False, **kwargs):
    """PPO on the world with a plain Trainer; returns the per-iteration metrics and the trainer."""
    seed_everything(0)
    module = PPOModule(model_name_or_path=sft, reward_model=reward, sampling=SamplingConfig(12),
                       export_dir=str(tmp_path / "export"), **kwargs)
    data = PromptDataModule(tokenizer_name_or_path=sft, batch_size=8, num_eval_prompts=8)
    recorder = IterationMetrics()
    trainer = Trainer(
        max_steps=iterations * updates_per_iteration, logger=logger, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[recorder, *callbacks], precision=precision,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder.rows, trainer


class StepsLogged(Logger):
    """The step each metric was logged at."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[str, int]] = []

    name, version = "steps", 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.steps += [(name, step) for name in metrics]

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_ppo_resumes_mid_run_with_the_same_numbers(tmp_path, world_sft_path, world_rm_path):
    settings = dict(kl_control=KLControlConfig(0.1, target=1.0, horizon=100),
                    update=UpdateConfig(epochs=2, num_minibatches=2))
    uninterrupted, _ = fit_world(tmp_path, world_sft_path, world_rm_path, 3, 4, **settings)
    _, trainer = fit_world(tmp_path, world_sft_path, world_rm_path, 2, 4, **settings)
    checkpoint = tmp_path / "two-iterations.ckpt"
    trainer.save_checkpoint(checkpoint)
    logged = StepsLogged()
    resumed, _ = fit_world(tmp_path, world_sft_path, world_rm_path, 3, 4, ckpt_path=str(checkpoint), logger=logged,
                           callbacks=[DataReport()], **settings)

    assert len(resumed) == 1
    # the data counts at the step PPO's metrics take, the iteration (they took the optimiser's: 8, far ahead of 2)
    assert {step for name, step in logged.steps if name.startswith("data/")} == {2}
    betas = [row["kl/beta"] for row in uninterrupted]
    assert len(set(betas)) == 3  # the adaptive controller moves β every iteration
    for name in ["kl/beta", "objective/scores", "objective/kl", "loss/policy", "loss/value", "policy/approxkl"]:
        assert resumed[0][name] == pytest.approx(uninterrupted[2][name], rel=1e-5, abs=1e-6), name
    # The command line holds: a β set anew on resuming is the β trained with (a warning names the change).
    refixed, _ = fit_world(tmp_path, world_sft_path, world_rm_path, 3, 4, ckpt_path=str(checkpoint),
                           **{**settings, "kl_control": KLControlConfig(0.02)})
    assert refixed[0]["kl/beta"] == pytest.approx(0.02)
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["ppo"]["iteration"] == 2
    assert not [key for key in saved["state_dict"] if key.startswith(("reference.", "reward_networks."))]
    assert any(key.startswith("critic.") for key in saved["state_dict"])


class LearningRate(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_ppo_steps_its_warmup_once_per_update(tmp_path, world_sft_path):
    """PPO optimises by hand, so its schedule moves only where it steps it: after each of an iteration's updates."""
    rate = LearningRate()
    fit_world(tmp_path, world_sft_path, "gold", 3, 2, callbacks=[rate], advantage=AdvantageConfig("rloo", 2),
              update=UpdateConfig(epochs=2), optimizer=OptimizerConfig(learning_rate=0.01, warmup_steps=4))
    assert rate.rates == pytest.approx([0.005, 0.01, 0.01], abs=1e-12)  # after 2, 4 and 6 of the 4 warm-up steps


def test_ppo_clips_its_gradients_under_mixed_precision(tmp_path, world_sft_path, world_rm_path):
    """Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimizer, and PPO clips every
    update (``update.max_grad_norm`` 1.0): under ``bf16-mixed`` the optimizer is the foreach kernel, in fp32 the
    fused one."""
    rows, trainer = fit_world(tmp_path, world_sft_path, world_rm_path, 2, 2, precision="bf16-mixed",
                             update=UpdateConfig(epochs=2))
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(row["loss/policy"])) for row in rows)
    assert trainer.optimizers[0].defaults["fused"] is False
    _, trainer = fit_world(tmp_path, world_sft_path, world_rm_path, 1, 2, update=UpdateConfig(epochs=2))
    assert trainer.optimizers[0].defaults["fused"] is True


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_with_ptx_on_gold_reward(tmp_path, world_sft_path, estimator):
    rows, trainer = fit_world(
        tmp_path, world_sft_path, "gold", 2, 1, advantage=AdvantageConfig(estimator, 2), update=UpdateConfig(epochs=1),
        ptx=PTXConfig(coef=0.5, batch_size=4),
    )
    module = trainer.lightning_module
    assert module.critic is None and len(module.reward_networks) == 0
    assert len(rows) == 2
    assert rows[-1]["loss/ptx"] > 0 and "loss/value" not in rows[-1]
    assert rows[0]["objective/scores"] == pytest.approx(rows[0]["rollout/gold/reward"])  # the proxy is the gold reward


def test_invalid_settings_fail_with_one_clear_error(world_sft_path):
    with pytest.raises(ConfigError, match="advantage.estimator must be gae, grpo or rloo"):
        PPOModule(model_name_or_path=world_sft_path, advantage={"estimator": "reinforce"})
    with pytest.raises(ConfigError, match="advantage.group_size"):
        PPOModule(model_name_or_path=world_sft_path, advantage={"estimator": "rloo", "group_size": 1})
    for setting, message in [({"update": {"clip_range": 0.0}}, "update.clip_range must be positive"),
                             ({"sampling": {"temperature": 0.0}}, "sampling.temperature must be positive"),
                             ({"kl_control": {"beta": -0.1}}, "beta must not be negative"),
                             ({"advantage": {"lam": 1.5}}, "advantage.lam must be between 0 and 1"),
                             ({"update": {"epochs": 0}}, "update.epochs must be positive"),
                             ({"reward": {"clip": -1.0}}, "reward.clip must be positive"),
                             ({"ptx": {"coef": 0.0}}, "ptx.coef must be positive")]:
        with pytest.raises(ConfigError, match=message):
            PPOModule(model_name_or_path=world_sft_path, **setting)
    module = PPOModule(model_name_or_path=world_sft_path, reward_model=world_sft_path, value_model="runs/nope")
    with pytest.raises(ConfigError, match=r"^model not found: runs/nope \(no such folder\)$|^cannot load a model"):
        module.configure_model()
    with pytest.raises(TypeError, match="kl_estimator"):  # k2/k3 as the per-token reward: not KL(π‖π_ref)'s gradient
        PPOModule(model_name_or_path=world_sft_path, kl_estimator="k3")
    module = PPOModule(model_name_or_path=world_sft_path, reward_model="no_such_module:reward")
    with pytest.raises(ConfigError, match=r"cannot import reward from no_such_module \(No module named 'no_such_"):
        module.configure_model()


def test_a_reward_function_beside_the_command_is_importable(tmp_path, monkeypatch):
    from lit_rlhf.cli import main
    from lit_rlhf.scoring import make_scorer

    (tmp_path / "my_reward.py").write_text("def reward(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    main(["world", "--out", str(tmp_path / "world")])  # the `lit-rlhf` script, as `python -m` would, adds the cwd
    assert make_scorer("my_reward:reward").score(["p", "p"], ["ab", "abcd"]).tolist() == [2.0, 4.0]


def test_a_non_finite_score_stops_the_run_before_anything_is_saved(world_sft_path, in_tmp, monkeypatch, capsys):
    (in_tmp / "nan_reward.py").write_text("def reward(prompts, responses):\n    return [float('nan')] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(in_tmp))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            "fit", "--config", CONFIG, "--model.model_name_or_path", world_sft_path,
            "--model.reward_model", "nan_reward:reward", "--model.update.epochs", "1", "--data.batch_size", "4",
            "--data.num_eval_prompts", "4", "--trainer.max_steps", "4", "--trainer.val_check_interval", "1",
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == ("lit-rlhf: error: objective/scores is nan at step 2: training stopped before anything saved it "
                     "(lower the learning rate, or check the data and reward)")
    assert not (in_tmp / "runs" / "ppo" / "hf").exists()
    assert not list(in_tmp.glob("runs/ppo/version_*/checkpoints/*.ckpt"))


def test_a_non_finite_loss_of_any_phase_names_itself_and_the_step():
    from types import SimpleNamespace

    from lit_rlhf.errors import TrainingDiverged
    from lit_rlhf.phases.shared import StopOnNonFinite

    trainer = SimpleNamespace(callback_metrics={"val/loss": torch.tensor(float("nan"))}, global_step=7)
    StopOnNonFinite().on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, 0)  # validation: not watched
    with pytest.raises(TrainingDiverged, match="^loss is inf at step 7: "):
        StopOnNonFinite().on_train_batch_end(trainer, None, {"loss": torch.tensor(float("inf"))}, None, 0)


def test_the_iteration_seed_defaults_to_the_runs_seed(world_sft_path):
    assert PPOModule(model_name_or_path=world_sft_path).seed == 0
    seed_everything(7)
    assert PPOModule(model_name_or_path=world_sft_path).seed == 7
    assert PPOModule(model_name_or_path=world_sft_path, seed=3).seed == 3


def test_entropy_bonus_enters_the_loss(tmp_path, world_sft_path):
    """Same rollouts, same first update: the bonus lowers the logged total only through −c·H, and H is a real
    entropy of a 146-word vocabulary's next-token distributions (between 0 and ln 146)."""
    import math

    rloo = AdvantageConfig("rloo", group_size=2)
    without, _ = fit_world(tmp_path, world_sft_path, "gold", 1, 1, update=UpdateConfig(epochs=1), advantage=rloo)
    with_bonus, _ = fit_world(tmp_path, world_sft_path, "gold", 1, 1, update=UpdateConfig(epochs=1, entropy_coef=0.5),
                              advantage=rloo)
    entropy = with_bonus[0]["policy/entropy"]
    assert 0.0 < entropy < math.log(146)
    assert entropy == pytest.approx(without[0]["policy/entropy"], rel=1e-5)
    assert with_bonus[0]["loss/policy"] == pytest.approx(without[0]["loss/policy"], rel=1e-5)


def test_the_policy_fits_prompt_and_new_tokens_and_the_reward_model_one_more(world_sft_path, world_rm_path):
    # The world's models have 128 positions; the reward model also reads the EOS after the response.
    fits = PPOModule(model_name_or_path=world_sft_path, reward_model="gold", advantage=AdvantageConfig("rloo"),
                     max_prompt_length=100, sampling=SamplingConfig(28))
    fits.configure_model()
    too_long = PPOModule(model_name_or_path=world_sft_path, reward_model=world_rm_path, max_prompt_length=100,
                         sampling=SamplingConfig(28))
    with pytest.raises(ConfigError, match="of up to 129 tokens do not fit"):
        too_long.configure_model()


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_are_normalised_once_per_sequence(world_sft_path, estimator):
    """Each sequence's tokens all carry its group advantage, unchanged: a second, token-weighted whitening would
    shift it by a length-weighted mean, so a group's advantages would no longer sum to zero (GRPO, RLOO)."""
    from lit_rlhf.data.collate import tokenize_prompts
    from lit_rlhf.evaluation import PolicyEvaluation

    module = PPOModule(model_name_or_path=world_sft_path, reward_model="gold",
                       advantage=AdvantageConfig(estimator, group_size=4), sampling=SamplingConfig(12))
    module.configure_model()
    reference_answers = PolicyEvaluation([], [], [], metrics={"response/length_mean": 0.0})
    module.evaluator = SimpleNamespace(baseline=lambda reference: reference_answers)  # no datamodule to hold out
    prompts = ["name three fruits .", "i think carrot is a fruit . give me two fruits .", "list one color ."]
    prompt_ids, prompt_mask = tokenize_prompts(module.tokenizer, prompts, 32)
    torch.manual_seed(0)
    rollout, _, _ = module._rollout({"prompt": prompts, "prompt_input_ids": prompt_ids,
                                     "prompt_attention_mask": prompt_mask})
    lengths = rollout.mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # the answers differ in length, which a token-level whitening weighs
    per_sequence = rollout.advantages.sum(dim=1) / lengths
    for row in range(len(rollout)):
        tokens = rollout.advantages[row][rollout.mask[row].bool()]
        assert torch.allclose(tokens, per_sequence[row].expand_as(tokens))
    assert torch.allclose(per_sequence.view(3, 4).sum(dim=1), torch.zeros(3), atol=1e-5)


def test_a_critic_from_the_reward_model_starts_on_the_normalised_score_scale(world_sft_path, world_rm_path, tmp_path):
    """Returns are built from scores normalised with the reward model's stored mean and std: the critic that starts
    as the reward model starts with its values on that scale, the reward model's score (s − mean) / std at the
    last token."""
    import json
    import shutil

    from lit_rlhf.data.collate import tokenize_prompts
    from lit_rlhf.models import scalar_scores
    from lit_rlhf.scoring import SCORE_MEAN_KEY, SCORE_STD_KEY

    reward_model = tmp_path / "rm"
    shutil.copytree(world_rm_path, reward_model)
    config = json.loads((reward_model / "config.json").read_text())
    (reward_model / "config.json").write_text(json.dumps({**config, SCORE_MEAN_KEY: 2.0, SCORE_STD_KEY: 4.0}))
    module = PPOModule(model_name_or_path=world_sft_path, reward_model=str(reward_model))
    module.configure_model()
    ids, mask = tokenize_prompts(module.tokenizer, ["name three fruits . apple , pear , plum ."], 32)
    raw = scalar_scores(module.reward_networks[0], ids, mask)
    assert torch.allclose(module.critic(ids, mask)[:, -1], (raw - 2.0) / 4.0, atol=1e-5)
    unnormalised = PPOModule(model_name_or_path=world_sft_path, reward_model=str(reward_model),
                             reward=RewardConfig(normalize=False))
    unnormalised.configure_model()
    assert torch.allclose(unnormalised.critic(ids, mask)[:, -1], raw, atol=1e-5)


def test_rollout_scores_tell_the_reward_which_answers_were_cut(world_sft_path):
    """Answers cut at ``max_new_tokens`` reach the scorer marked unfinished (a reward model scores them without
    EOS), and ``reward.missing_eos_penalty`` comes off exactly those."""
    from lit_rlhf.data.collate import tokenize_prompts
    from lit_rlhf.evaluation import PolicyEvaluation

    class Recorder:
        finished: list = []

        def score(self, prompts, responses, finished=None):
            Recorder.finished = finished
            return torch.zeros(len(responses))

    module = PPOModule(model_name_or_path=world_sft_path, reward_model="gold", advantage=AdvantageConfig("rloo", 2),
                       sampling=SamplingConfig(6), reward=RewardConfig(normalize=False, missing_eos_penalty=1.5))
    module.configure_model()
    module.scorer = Recorder()
    reference_answers = PolicyEvaluation([], [], [], metrics={"response/length_mean": 0.0})
    module.evaluator = SimpleNamespace(baseline=lambda reference: reference_answers)  # no datamodule to hold out
    prompts = ["name three fruits .", "i think carrot is a fruit . give me two fruits .", "list one color ."] * 4
    prompt_ids, prompt_mask = tokenize_prompts(module.tokenizer, prompts, 32)
    torch.manual_seed(0)
    _, metrics, samples = module._rollout({"prompt": prompts, "prompt_input_ids": prompt_ids,
                                           "prompt_attention_mask": prompt_mask})
    assert 0 < sum(Recorder.finished) < len(Recorder.finished)
    eos_fraction = metrics["rollout/response/eos_fraction"].item()
    assert sum(Recorder.finished) / len(Recorder.finished) == pytest.approx(eos_fraction)
    assert [sample["score"] for sample in samples] == [0.0 if ended else -1.5 for ended in Recorder.finished]


def test_micro_batches_add_up_to_the_gradient_of_their_whole_minibatch():
    """Gradient accumulation: one row of 1 response token with advantage +1, one of 3 with advantage −1. The whole
    minibatch's loss is the mean over its 4 tokens, (−1 + 3) / 4 = 0.5; equal weights of the two micro-batches'
    means gave (−1 + 1) / 2 = 0 and counted the short row's token three times as much."""
    from lit_rlhf.losses import ppo_policy_loss
    from lit_rlhf.phases.ppo_buffer import Rollout, token_shares

    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    advantages = torch.tensor([[1.0, 0, 0], [-1, -1, -1]])
    old_logprobs = torch.full((2, 3), -1.0)
    rollout = Rollout(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), torch.ones(2, 4), mask, old_logprobs,
                      advantages)
    micro_batches = [rollout.select(torch.tensor([0])), rollout.select(torch.tensor([1]))]
    assert [share.item() for share in token_shares(micro_batches)] == [0.25, 0.75]

    logprobs = old_logprobs.clone().requires_grad_()
    whole, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    whole.backward()
    whole_grad, logprobs.grad = logprobs.grad.clone(), None
    accumulated = 0.0
    for row, (micro_batch, share) in enumerate(zip(micro_batches, token_shares(micro_batches))):
        loss, _ = ppo_policy_loss(logprobs[row : row + 1], micro_batch.logprobs, micro_batch.advantages,
                                  micro_batch.mask, clip_range=0.2)
        (share * loss).backward()
        accumulated += (share * loss).item()
    assert whole.item() == pytest.approx(0.5) and accumulated == pytest.approx(0.5)
    torch.testing.assert_close(logprobs.grad, whole_grad)
    assert logprobs.grad[0, 0].item() == pytest.approx(-0.25) and logprobs.grad[1].tolist() == [0.25] * 3


def test_target_kl_drops_the_rest_of_an_iterations_updates(tmp_path, world_sft_path):
    """Each iteration's first minibatch starts at the policy that sampled (approxkl 0, within rounding), so it steps;
    after that step the policy has moved more than 1e-6 nats, and the three remaining updates are dropped. Without
    ``target_kl`` every iteration makes all epochs × num_minibatches = 4."""
    rloo = AdvantageConfig("rloo", group_size=2)
    stopped, _ = fit_world(tmp_path, world_sft_path, "gold", 3, 1, advantage=rloo,
                           update=UpdateConfig(epochs=2, num_minibatches=2, target_kl=1e-6))
    assert [(row["policy/updates"], row["policy/early_stop"]) for row in stopped] == [(1.0, 1.0)] * 3
    full, _ = fit_world(tmp_path, world_sft_path, "gold", 2, 4, advantage=rloo,
                        update=UpdateConfig(epochs=2, num_minibatches=2))
    assert [(row["policy/updates"], row["policy/early_stop"]) for row in full] == [(4.0, 0.0)] * 2


def test_health_limits_name_each_breach_and_a_kl_spike_over_its_running_median():
    health = PPOHealth()
    healthy = {"policy/approxkl": 0.01, "policy/clipfrac": 0.05, "rollout/response/eos_fraction": 1.0}
    assert health.check(0, healthy | {"objective/kl": 0.5}) == []
    assert health.check(1, healthy | {"objective/kl": 1.2}) == []  # over the floor, under 3 × the median 0.5
    assert health.check(2, healthy | {"objective/kl": 0.9}) == []
    found = health.check(3, {"policy/approxkl": 0.3, "policy/clipfrac": 0.2, "rollout/response/eos_fraction": 0.4,
                             "objective/kl": 57.0})
    assert found == [
        "iteration 3: policy/approxkl 0.300 > 0.02",
        "iteration 3: policy/clipfrac 0.200 > 0.1",
        "iteration 3: rollout/response/eos_fraction 0.400 < 0.95",
        "iteration 3: objective/kl 57.000 > 3.0 x the earlier iterations' median 0.900",  # of 0.5, 1.2, 0.9
    ]
    assert health.breaches == found
    restored = PPOHealth()
    restored.load_state_dict(health.state_dict())
    assert restored.breaches == found and restored.rollout_kls == [0.5, 1.2, 0.9, 57.0]
    collapsed = PPOHealth()
    assert collapsed.check(0, {"objective/kl": 0.0}) == []  # the first iteration has nothing to compare with
    assert collapsed.check(1, {"objective/kl": 55.0}) != []  # the collapse after the first update is a spike
    assert PPOHealth().check(0, {"objective/kl": 0.9}) == []


def test_every_iteration_outside_the_health_limits_is_counted(in_tmp, world_sft_path, world_rm_path):
    """The counted breaches are those the logged metrics show, iteration by iteration (the main job's PPO has none
    at all: tests/test_main_job.py; this fixture's briefly trained policy moves more at its first update)."""
    run_cli("fit", "--config", CONFIG, "--model.model_name_or_path", world_sft_path, "--model.reward_model",
            world_rm_path, "--data.batch_size", "16", "--data.num_eval_prompts", "4", "--trainer.max_steps", "24",
            "--trainer.val_check_interval", "3")
    run = latest_run(in_tmp, "ppo")
    approxkl, clipfrac = metric_series(run, "policy/approxkl"), metric_series(run, "policy/clipfrac")
    eos = metric_series(run, "rollout/response/eos_fraction")
    assert len(approxkl) == 3
    expected = 0
    for iteration in range(3):
        expected += (approxkl[iteration] > HealthLimits.approxkl) + (clipfrac[iteration] > HealthLimits.clipfrac)
        expected += eos[iteration] < HealthLimits.eos_fraction
        assert metric_series(run, "health/breaches")[iteration] == expected  # rollout KL stays under 1 nat here
