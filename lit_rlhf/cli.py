"""The command line: ``lit-rlhf fit|validate --config configs/<phase>.yaml`` and a few extra commands.

The phase commands are LightningCLI (subclass mode for model and data, so a config names the classes).
The extra commands (``world``, …) are thin argparse front-ends over library functions. Errors a user can
meet are printed on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, get_type_hints

import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_rlhf import RUNS_DIR_VARIABLE
from lit_rlhf.data.datamodules import DataReport
from lit_rlhf.errors import ConfigError, LitRLHFError
from lit_rlhf.phases.shared import StopOnNonFinite
from lit_rlhf.trainer_parts import (
    RUNS_DIR,
    CheckpointAtEnd,
    LastValidatedStep,
    TrainingProgressBar,
    default_loggers,
    quiet_library_notices,
)

LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values that Lightning resolves itself rather than paths."""
SETTINGS_FILES = {"config.yaml", "hparams.yaml"}
"""What a run folder holds before anything is logged: a failed run's folder with only these is removed."""
DESCRIPTION = """\
The RLHF recipe on PyTorch Lightning. Phases: lit-rlhf fit --config configs/{sft,rm,ppo,dpo}.yaml
(ipo, kto, simpo too). More commands, each with --help:
  lit-rlhf pipeline   SFT -> collect -> reward model -> PPO, DPO and best-of-n, resumable stage by stage
  lit-rlhf collect    k samples per prompt ranked by a judge, written as C(k,2) comparisons
  lit-rlhf sweep     a W&B sweep file (sweeps/*.yaml): online with W&B's agent, offline grid/random here
  lit-rlhf report    an HTML page and PNG plots of a pipeline's or a sweep's folder
  lit-rlhf dashboard a saved W&B workspace with the report's panels (needs WANDB_API_KEY)
  lit-rlhf world      write the embedded world's datasets"""


class _KeepLineBreaks(DefaultHelpFormatter):
    """Prints the description's lines as they are written (the command list)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _phase_name(model_config, runs_dir: str) -> str:
    """The run folder under ``runs_dir``: beside an export there (``export_dir: runs/ipo/hf`` → ``ipo``), else the
    phase's module (``lit_rlhf.phases.reward.RewardModelModule`` → ``reward``)."""
    export_dir = (model_config.get("init_args") or {}).get("export_dir")
    if export_dir and Path(export_dir).resolve().parent.parent == Path(runs_dir).resolve():
        return Path(export_dir).parent.name
    class_path = model_config.class_path
    return class_path.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in class_path else "run"


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, whose refusal of a command line is one line on stderr and exit status 2. jsonargparse
    prints the whole usage first, then for an option a module does not take seven lines on the union of types it
    tried, the reason in the middle."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse trying the types of a union: it raises, to try the next
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        print(f"lit-rlhf: error: {command_line_reason(message)} ({prog} --help lists the options)", file=sys.stderr)
        raise SystemExit(2)


def command_line_reason(message: str) -> str:
    """jsonargparse's explanation of a refused command line in one line: the dotted key and the first reason given
    for it. A value no type of a union took (a module's option) is explained as a tree, each level a ``Parser key``
    and the types tried, down to the reason; any other explanation is its lines joined."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    keys: list[str] = []
    for line in lines if re.match(r'Parser key "[^"]+":$', lines[0]) else []:
        if key := re.match(r'Parser key "([^"]+)":$', line):
            keys.append(key.group(1))
        elif not line.startswith(("Does not validate against any", "Subtypes:", "Errors:", "Problem with given")):
            return f"{'.'.join(keys)}: {line}" if keys else line
    return " ".join(lines)


class RLHFCLI(LightningCLI):
    """LightningCLI with CPU-friendly defaults, linked tokenizer and prompt length, and a validation pass
    before training so the first logged row is the untrained model. Its subcommands are ``fit`` and ``validate``:
    the phases hold out a validation split and measure it (``val/`` and the held-out ``eval/`` metrics), which
    ``validate`` runs on any checkpoint; they have no test split or predictions of their own, so Lightning's
    ``test`` and ``predict`` would only fail after loading everything."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def __init__(self, args: list[str] | None = None, run: bool = True, runs_dir: str | None = None) -> None:
        runs_dir = runs_dir or os.environ.get(RUNS_DIR_VARIABLE) or RUNS_DIR
        self.runs_dir = runs_dir
        quiet_library_notices()
        try:
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
                    "callbacks": [DataReport(), LastValidatedStep(), StopOnNonFinite()],
                },
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": "lit-rlhf", "description": DESCRIPTION, "formatter_class": _KeepLineBreaks},
                parser_class=OneLineErrorParser,
                args=args,
                run=run,
            )
        except BaseException:
            self._remove_unused_log_dir()
            raise

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")
        parser.link_arguments("data.init_args.max_prompt_length", "model.init_args.max_prompt_length")

    def before_instantiate_classes(self) -> None:
        """Name each default logger's run folder after the phase, and put the logs under the trainer's
        ``default_root_dir`` when the user set one (as a Lightning user expects), else under ``runs_dir``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or self.runs_dir
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is None:
                continue
            if init_args.get("save_dir") == self.runs_dir:
                init_args.save_dir = str(root)
            if "name" in init_args and init_args.name in (None, "lightning_logs"):
                init_args.name = _phase_name(config.model, str(root))

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The default progress bar and checkpointing are :class:`TrainingProgressBar` and :class:`CheckpointAtEnd`,
        unless switched off or given among the callbacks. Lightning's refusals of a trainer setting
        (``configs/trainer/ddp.yaml`` on a machine without GPUs) are the user's to fix: one line. Its errors later in
        the run may be bugs, and keep their traceback."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        callbacks = config.trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        for enabled, kind, default in (("enable_progress_bar", ProgressBar, TrainingProgressBar),
                                       ("enable_checkpointing", Checkpoint, CheckpointAtEnd)):
            if config.trainer.get(enabled) is not False and not any(isinstance(c, kind) for c in callbacks):
                callbacks.append(default())
        try:
            return super().instantiate_trainer(**kwargs, callbacks=callbacks)
        except (MisconfigurationException, ValueError) as error:  # Lightning raises both for settings it refuses
            raise ConfigError(f"trainer: {error}") from error

    def _remove_unused_log_dir(self) -> None:
        """A run that failed before it logged anything (bad data, a model that does not fit the settings) leaves no
        run folder holding only its settings behind, nor the phase's folder it made for it."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            folder = Path(logger.log_dir) if isinstance(logger, CSVLogger) else None
            if folder is None or not folder.is_dir() or {path.name for path in folder.iterdir()} - SETTINGS_FILES:
                continue
            shutil.rmtree(folder)
            if folder.parent != Path(logger.save_dir) and not any(folder.parent.iterdir()):
                folder.parent.rmdir()

    def _parse_ckpt_path(self) -> None:
        """Lightning's LightningCLI replaces the model's arguments with those saved in ``--ckpt_path``, silently
        dropping what the command line says (a new ``export_dir`` or learning rate). Here the command line wins, as
        for every other setting, and each argument that differs from the checkpoint's is named."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in LIGHTNING_CHECKPOINT_NAMES and not Path(ckpt_path).exists():
            raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file or folder")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        model = self.config[subcommand].model
        if saved.get("_class_path") not in (None, model.class_path):
            raise ConfigError(f"{ckpt_path} holds a {saved['_class_path']}, not the configured {model.class_path}")
        given = (model.get("init_args") or Namespace()).as_dict()  # settings groups as plain mappings, as saved
        if "lora" in saved and "lora" in given and saved["lora"] != given["lora"]:
            raise ConfigError(f"{ckpt_path} holds the weights of lora={saved['lora']!r}, which lora={given['lora']!r} "
                              "cannot load: resume with the checkpoint's lora, or start from its export")
        changed = [
            f"{name}={given[name]!r} (checkpoint: {value!r})" for name, value in saved.items()
            if not name.startswith("_") and name in given and given[name] != value
        ]
        if changed:
            rank_zero_warn(f"resuming {ckpt_path} with changed model arguments: {', '.join(changed)}")

    def before_fit(self) -> None:
        trainer = self.trainer
        if not self.model.automatic_optimization and (trainer.accumulate_grad_batches != 1 or
                                                      trainer.gradient_clip_val):
            raise ConfigError(
                f"{type(self.model).__name__} steps its optimiser itself, so trainer.accumulate_grad_batches and "
                "trainer.gradient_clip_val do not apply: set its own model.update.gradient_accumulation_steps and "
                "model.update.max_grad_norm"
            )
        if self.config.fit.get("ckpt_path") is None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

    def after_fit(self) -> None:
        last_validated = next((c for c in self.trainer.callbacks if isinstance(c, LastValidatedStep)), None)
        if last_validated is not None and last_validated.step != self.trainer.global_step:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        # A W&B run outlives its WandbLogger: finish it, or the next fit in this process (the pipeline's next
        # stage) logs into it.
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # a no-op stand-in on ranks other than 0


def fit_phase(args: list[str], runs_dir: str) -> RLHFCLI:
    """``lit-rlhf fit ARGS`` with logs under ``runs_dir``: how the pipeline runs its ``fit`` stages."""
    with warnings.catch_warnings():
        # LightningCLI warns when it gets args while sys.argv holds others: here they are the pipeline's, on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return RLHFCLI(args=["fit", *args, "--trainer.enable_progress_bar", "false"], runs_dir=runs_dir)


def _world_command(argv: list[str]) -> None:
    from lit_rlhf.world import write_world

    parser = argparse.ArgumentParser(prog="lit-rlhf world", description="Write the embedded world's datasets.")
    parser.add_argument("--out", required=True, help="folder to write the JSONL files and tokenizer into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_world(args.out, seed=args.seed).items():
        print(f"{name}: {path}")


COLLECT_DEFAULTS = {"policy": "runs/sft/hf", "on_bad_row": "error"}
"""The collect command's defaults where a collect stage has none of its own: a policy, and ``on_bad_row`` (a stage's
is the pipeline file's)."""


def _collect_command(argv: list[str]) -> None:
    from lit_rlhf.collect import collect_comparisons
    from lit_rlhf.generation import SamplingConfig
    from lit_rlhf.pipeline_spec import CollectStage, build_spec_from_text

    parser = argparse.ArgumentParser(
        prog="lit-rlhf collect",
        description="Sample k responses per prompt from a policy, rank them with a judge, write all C(k,2) pairs. "
        "Its options but --out and --seed are a pipeline file's collect stage keys (docs/pipeline.md), checked alike.",
    )
    _add_spec_options(parser, CollectStage, COLLECT_DEFAULTS)
    parser.add_argument("--reward-model", help="The older name of --judge-model.")
    parser.add_argument("--out", default="runs/collect", help="Output folder (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts drawn and the sampling "
                        "(default: %(default)s).")
    given = vars(parser.parse_args(argv))
    out, seed, reward_model = given.pop("out"), given.pop("seed"), given.pop("reward_model")
    if reward_model is not None:
        if "judge_model" in given:
            raise ConfigError("--reward-model and --judge-model name the same thing: give one")
        given["judge_model"] = reward_model
    stage = build_spec_from_text(CollectStage, {"name": "collect", **COLLECT_DEFAULTS, **given}, "collect")
    summary = collect_comparisons(
        stage.policy, out, k=stage.k, judge=stage.judge, judge_model=stage.judge_model, prompts_path=stage.prompts,
        num_prompts=stage.num_prompts, sampling=SamplingConfig(stage.max_new_tokens, stage.temperature),
        max_prompt_length=stage.max_prompt_length, seed=seed, reward=stage.reward, principles_path=stage.principles,
        on_bad_row=stage.on_bad_row or COLLECT_DEFAULTS["on_bad_row"],  # --on-bad-row null, as in a file
    )
    print(
        f"{summary.prompts} prompts x {summary.k} responses, judged by {summary.judge}: {summary.pairs} pairs "
        f"({summary.ties_dropped} ties dropped) in {summary.seconds:.1f}s -> {out}"
        + (f"; agrees with gold on {summary.gold_agreement:.1%} of decided pairs"
           if summary.gold_agreement is not None else "")
    )


def _add_spec_options(parser: argparse.ArgumentParser, spec_class: type, defaults: dict[str, str]) -> None:
    """An option ``--<key>`` for each field of ``spec_class`` but ``name``, its help the field's docstring with its
    default (``defaults``', else the field's). An option given stays text, for
    :func:`~lit_rlhf.pipeline_spec.build_spec_from_text` to check as a file's value; one left out is not set."""
    from lit_rlhf.pipeline_spec import field_docs, literal_choices

    docs, types_ = field_docs(spec_class), get_type_hints(spec_class)
    for spec_field in (spec_field for spec_field in dataclasses.fields(spec_class) if spec_field.name != "name"):
        choices = literal_choices(types_[spec_field.name])
        text = docs.get(spec_field.name, "").replace("``", "").replace("%", "%%").rstrip(".")
        parser.add_argument(
            f"--{spec_field.name.replace('_', '-')}", dest=spec_field.name, default=argparse.SUPPRESS,
            metavar="{" + ",".join(choices) + "}" if choices else None,
            help=f"{text} (default: {defaults.get(spec_field.name, spec_field.default)}).",
        )


def _pipeline_command(argv: list[str]) -> None:
    from lit_rlhf.pipeline import run_pipeline, run_seeds
    from lit_rlhf.report import publish_report

    parser = argparse.ArgumentParser(
        prog="lit-rlhf pipeline",
        description="SFT -> collect -> reward model -> PPO, plus DPO and best-of-n; resumable stage by stage.",
    )
    parser.add_argument("--config", default="configs/pipeline.yaml", help="pipeline file (default: %(default)s)")
    parser.add_argument("--out", help="output folder (default: the file's 'out', else runs/pipeline)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo this stage (repeatable)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="seed of every stage (default: the file's 'seed', else 0)")
    seeds.add_argument("--seeds", type=_seed_list, metavar="N,N,...",
                       help="run once per seed into OUT/seed_<n>/, then OUT/aggregate.json: means and 95%% intervals "
                            "over the seeds, and the paired differences over them in OUT/paired.json")
    args = parser.parse_args(argv)
    if args.seeds:
        run_seeds(args.config, fit_phase, args.seeds, args.out, tuple(args.force), then=publish_report)
    else:
        run_pipeline(args.config, fit_phase, args.out, tuple(args.force), args.seed, then=publish_report)


def _seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
    return seeds


def _sweep_command(argv: list[str]) -> None:
    from lit_rlhf.sweep import run_sweep

    parser = argparse.ArgumentParser(
        prog="lit-rlhf sweep",
        description="Run a W&B sweep file: with WANDB_API_KEY on W&B (wandb sweep + wandb agent), else its grid or "
        "random trials here, one subprocess each, resumable. The pipeline stages the trials start from run first.",
    )
    parser.add_argument("file", help="W&B sweep file, e.g. sweeps/ppo_beta.yaml")
    parser.add_argument("--count", type=int, help="number of trials (random sweeps; cuts a grid short)")
    parser.add_argument("--out", help="offline trials' folder (default: runs/sweeps/<file name>)")
    parser.add_argument("--pipeline", default="configs/pipeline.yaml",
                        help="pipeline whose stages the trials start from (default: %(default)s)")
    parser.add_argument("--project", default="lit-rlhf", help="W&B project, online (default: %(default)s)")
    parser.add_argument("--entity", help="W&B entity, online (default: yours)")
    parser.add_argument("--offline", action="store_true", help="run the trials here even with WANDB_API_KEY set")
    args = parser.parse_args(argv)
    run_sweep(args.file, fit_phase, args.out, args.count, args.pipeline, online=False if args.offline else None,
              project=args.project, entity=args.entity)


def _report_command(argv: list[str]) -> None:
    from lit_rlhf.report import build_report, publish_to_wandb

    parser = argparse.ArgumentParser(
        prog="lit-rlhf report",
        description="One self-contained HTML page and its PNG plots from pipeline and sweep folders.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a pipeline's --out or a sweep's --out folder")
    parser.add_argument("--out", help="report folder (default: the first DIR's report/)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the plots and tables to W&B (offline unless WANDB_API_KEY is set)")
    args = parser.parse_args(argv)
    report = build_report(args.dirs, args.out)
    if args.wandb:
        publish_to_wandb(report)
    print(f"report: {report.html_path}")


def _dashboard_command(argv: list[str]) -> None:
    from lit_rlhf.report import save_dashboard

    parser = argparse.ArgumentParser(
        prog="lit-rlhf dashboard",
        description="Save a W&B workspace with the report's panels (overoptimisation, hacking, PPO, DPO, reward "
        "model) in a project; needs WANDB_API_KEY and the wandb-workspaces package.",
    )
    parser.add_argument("--project", default="lit-rlhf", help="W&B project (default: %(default)s)")
    parser.add_argument("--entity", help="W&B entity (default: yours)")
    parser.add_argument("--name", default="lit-rlhf", help="workspace name (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"dashboard: {save_dashboard(args.project, args.entity, args.name)}")


EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "world": _world_command,
    "collect": _collect_command,
    "pipeline": _pipeline_command,
    "sweep": _sweep_command,
    "report": _report_command,
    "dashboard": _dashboard_command,
}


def _user_error(error: BaseException) -> LitRLHFError | None:
    """The package's own error behind ``error``: jsonargparse re-raises what a class raised while being built as a
    ``ValueError`` caused by it."""
    while error is not None and not isinstance(error, LitRLHFError):
        error = error.__cause__
    return error


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:  # as under `python -m lit_rlhf`: a reward function beside the command imports
        sys.path.insert(0, os.getcwd())
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[argv[0]](argv[1:])
        else:
            RLHFCLI(args=None if from_command_line else argv)
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None:
            raise
        print(f"lit-rlhf: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
