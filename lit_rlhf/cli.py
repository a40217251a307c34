"""The command line: ``lit-rlhf fit|validate|test --config configs/<phase>.yaml`` and a few extra commands.

The phase commands are LightningCLI (subclass mode for model and data, so a config names the classes).
The extra commands (``world``, …) are thin argparse front-ends over library functions. Errors a user can
meet are printed on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.data.datamodules import DataReport
from lit_rlhf.errors import LitRLHFError

RUNS_DIR = "runs"


def default_loggers(runs_dir: str = RUNS_DIR) -> list[dict]:
    """CSV always; W&B too, offline unless ``WANDB_API_KEY`` is set (never a login prompt), off when
    ``WANDB_MODE=disabled``. Both write under ``runs_dir``."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": runs_dir}}]
    if os.environ.get("WANDB_MODE") != "disabled":
        offline = not os.environ.get("WANDB_API_KEY")
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"save_dir": runs_dir, "project": "lit-rlhf", "offline": offline},
            }
        )
    return loggers


def _phase_name(model_class_path: str) -> str:
    """``lit_rlhf.phases.reward.RewardModelModule`` → ``reward``: the run folder under ``runs/``."""
    module_path = model_class_path.rsplit(".", 1)[0]
    return module_path.rsplit(".", 1)[-1] if "." in model_class_path else "run"


class RLHFCLI(LightningCLI):
    """LightningCLI with CPU-friendly defaults, linked tokenizer and prompt length, and a validation pass
    before training so the first logged row is the untrained model."""

    def __init__(self, args: list[str] | None = None, run: bool = True, runs_dir: str = RUNS_DIR) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults={
                "logger": default_loggers(runs_dir),
                "default_root_dir": runs_dir,
                "num_sanity_val_steps": 0,
                "inference_mode": False,
                "log_every_n_steps": 10,
                "enable_model_summary": False,
                "callbacks": [DataReport()],
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lit-rlhf"},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")
        parser.link_arguments("data.init_args.max_prompt_length", "model.init_args.max_prompt_length")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "name" in init_args and init_args.name in (None, "lightning_logs"):
                init_args.name = _phase_name(config.model.class_path)

    def before_fit(self) -> None:
        if self.config.fit.get("ckpt_path") is None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)


def fit_phase(args: list[str], runs_dir: str) -> RLHFCLI:
    """``lit-rlhf fit ARGS`` with logs under ``runs_dir``: how the pipeline runs its ``fit`` stages."""
    return RLHFCLI(args=["fit", *args, "--trainer.enable_progress_bar", "false"], runs_dir=runs_dir)


def _world_command(argv: list[str]) -> None:
    from lit_rlhf.world import write_world

    parser = argparse.ArgumentParser(prog="lit-rlhf world", description="Write the embedded world's datasets.")
    parser.add_argument("--out", required=True, help="folder to write the JSONL files and tokenizer into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_world(args.out, seed=args.seed).items():
        print(f"{name}: {path}")


def _collect_command(argv: list[str]) -> None:
    from lit_rlhf.collect import collect_comparisons
    from lit_rlhf.judges import JUDGES
    from lit_rlhf.rollout import SamplingConfig

    parser = argparse.ArgumentParser(
        prog="lit-rlhf collect",
        description="Sample k responses per prompt from a policy, rank them with a judge, write all C(k,2) pairs.",
    )
    parser.add_argument("--policy", default="runs/sft/hf", help="policy export (default: %(default)s)")
    parser.add_argument("--out", default="runs/collect", help="output folder (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt (default: %(default)s)")
    parser.add_argument("--judge", choices=JUDGES, default="raters", help="who ranks (default: %(default)s)")
    parser.add_argument("--reward-model", help="reward model export, for --judge reward_model")
    parser.add_argument("--judge-model", help="causal LM name or path, for --judge llm")
    parser.add_argument("--prompts", help="prompt dataset (default: the embedded world's training prompts)")
    parser.add_argument("--num-prompts", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = collect_comparisons(
        args.policy, args.out, k=args.k, judge=args.judge, judge_model=args.judge_model or args.reward_model,
        prompts_path=args.prompts, num_prompts=args.num_prompts,
        sampling=SamplingConfig(args.max_new_tokens, args.temperature), seed=args.seed,
    )
    print(
        f"{summary.prompts} prompts x {summary.k} responses, judged by {summary.judge}: {summary.pairs} pairs "
        f"({summary.ties_dropped} ties dropped) in {summary.seconds:.1f}s -> {args.out}"
        + (f"; agrees with gold on {summary.gold_agreement:.1%} of decided pairs" if summary.gold_agreement else "")
    )


def _pipeline_command(argv: list[str]) -> None:
    from lit_rlhf.pipeline import run_pipeline

    parser = argparse.ArgumentParser(
        prog="lit-rlhf pipeline",
        description="SFT -> collect -> reward model -> PPO, plus DPO and best-of-n; resumable stage by stage.",
    )
    parser.add_argument("--config", default="configs/pipeline.yaml", help="pipeline file (default: %(default)s)")
    parser.add_argument("--out", help="output folder (default: the file's 'out', else runs/pipeline)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo this stage (repeatable)")
    args = parser.parse_args(argv)
    run_pipeline(args.config, fit_phase, args.out, tuple(args.force))


EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "world": _world_command,
    "collect": _collect_command,
    "pipeline": _pipeline_command,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[argv[0]](argv[1:])
        else:
            RLHFCLI(args=argv)
    except LitRLHFError as error:
        print(f"lit-rlhf: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
