"""Benchmark lit-rlhf's phases against TRL on the same work: `python bench/run.py` (bench/README.md).

For each phase, lit-rlhf and its TRL peer run interleaved (lit, peer, lit, peer, ...) for ``--passes`` passes,
each run in its own subprocess, on the same cached tiny GPT-2, tokenizer and rows, fp32, on the CPU. Throughput is
measured over steady-state steps by a timing callback on each side; the table gives it per pass, the ratio
lit-rlhf ÷ peer per pass, the MFU against this CPU's measured fp32 matmul peak, and each side's peak RSS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `python bench/run.py` puts bench/ on the path, not the repository root

from bench.assets import CACHE_DIR, CASES, LARGE, SMALL, Assets, load_or_build  # noqa: E402
from bench.timing import UNITS  # noqa: E402

BENCH_DIR = REPO_ROOT / "bench"
CONFIGS_DIR = REPO_ROOT / "configs"

# --- lit-rlhf's command line: every override the bench makes, in one place ---------------------------------------
#
# Each lit-rlhf run is `lit-rlhf fit --config configs/<phase>.yaml` plus these. Everything else (learning rate and
# schedule, β, PPO's minibatches and coefficients, ...) is the phase's config file as it is, and the TRL peer is
# given the same values (see peer_hyperparameters). Values are str.format templates over the settings that
# run_side fills in for each run (paths, sizes, step count, the callback's JSON).
LIT_CLI_OVERRIDES: dict[str, dict[str, str]] = {
    "every phase": {
        # the shared work
        "--model.model_name_or_path": "{policy}",
        "--data.path": "{data}",
        "--data.batch_size": "{batch_size}",
        "--data.max_length": "{max_length}",
        "--data.max_prompt_length": "{max_prompt_length}",  # above every prompt: nothing is cut
        "--trainer.max_steps": "{lit_max_steps}",
        # one process; fp32 on the CPU unless --accelerator/--precision say otherwise
        "--trainer.accelerator": "{accelerator}",
        "--trainer.devices": "1",
        "--trainer.precision": "{precision}",
        # nothing but training while the clock runs: no validation, logging, checkpoints or progress bar
        "--trainer.limit_val_batches": "0",
        "--trainer.logger": "false",
        "--trainer.enable_checkpointing": "false",
        "--trainer.enable_progress_bar": "false",
        # the export at the end of fit (after the timing) goes to the run's scratch folder
        "--model.export_dir": "{scratch}/export",
        "--trainer.default_root_dir": "{scratch}",
        # the timing callback, added to the CLI's own
        "--trainer.callbacks+": "{timing_callback}",
    },
    # SFT, reward model, DPO: train on every row (TRL holds none out either).
    "sft": {"--data.val_fraction": "0"},
    "rm": {"--data.val_fraction": "0"},
    "dpo": {"--data.val_fraction": "0", "--model.precompute_ref_logps": "false"},
    "dpo_precomputed": {"--data.val_fraction": "0", "--model.precompute_ref_logps": "true"},
    # PPO: the bench's reward model; exactly response_length sampled tokens (the policy-no-eos tokenizer never ends
    # a sample early); the held-out prompts are only answered once, in the first (warm-up) iteration, as the
    # baseline of the rollout metrics: a batch of them is enough.
    "ppo": {
        "--model.reward_model": "{reward}",
        "--model.sampling.max_new_tokens": "{response_length}",
        "--model.update.epochs": "{ppo_epochs}",
        "--data.num_eval_prompts": "{batch_size}",
    },
}


@dataclass(frozen=True)
class Phase:
    """One row of the table: a lit-rlhf phase and the TRL trainer doing the same work."""

    key: str
    label: str
    config: str
    data: str
    """Which data file: demonstrations, comparisons or prompts."""
    unit: str
    peer_venv: str
    peer_label: str
    default_steps: int
    ppo_epochs: int = 0

    @property
    def is_ppo(self) -> bool:
        return self.ppo_epochs > 0

    @property
    def peer_phase(self) -> str:
        return "ppo" if self.is_ppo else self.key

    @property
    def overrides_key(self) -> str:
        return "ppo" if self.is_ppo else self.key


TRL1, TRL019 = ".venv-trl1", ".venv-trl019"
PHASES = {
    phase.key: phase
    for phase in (
        Phase("sft", "SFT", "sft.yaml", "demonstrations", "tokens", TRL1, "SFTTrainer, completion-only loss", 20),
        Phase("rm", "reward model", "rm.yaml", "comparisons", "pairs", TRL1, "RewardTrainer", 20),
        Phase("dpo", "DPO, live reference", "dpo.yaml", "comparisons", "pairs", TRL1, "DPOTrainer", 20),
        Phase("dpo_precomputed", "DPO, precomputed reference", "dpo.yaml", "comparisons", "pairs", TRL1,
              "DPOTrainer(precompute_ref_log_probs=True)", 20),
        Phase("ppo", "PPO, 4 epochs", "ppo.yaml", "prompts", "episodes", TRL019, "PPOTrainer", 6, ppo_epochs=4),
        Phase("ppo_1epoch", "PPO, 1 epoch", "ppo.yaml", "prompts", "episodes", TRL019, "PPOTrainer", 6,
              ppo_epochs=1),
    )
}


# --- model FLOPs and the CPU's peak ------------------------------------------------------------------------------
#
# Model FLOPs per token follow the usual estimate: a forward pass costs 2·N FLOPs per token and a training step
# (forward + backward) 6·N, for N the parameters that multiply once per token. N counts the transformer blocks and,
# in the causal LM, the tied embedding once (as the LM-head matmul); position and input-embedding lookups cost
# nothing (bench/assets.py). Attention's sequence-length term is left out, as is usual at these lengths. Both sides
# are charged the same FLOPs for the same work, so their MFU ratio is their throughput ratio; work one side does
# and the other avoids (lit-rlhf's extra policy forward in PPO, see below) is not credited.


def flops_per_token(phase: Phase, assets: Assets) -> float:
    """Model FLOPs per (non-padding) token of the timed steps, ``n`` the causal LM's and ``s`` the scalar-head
    model's parameter count.

    - SFT: 6n (train the policy).
    - reward model: 6s (train the scalar-head model).
    - DPO, live reference: 6n + 2n (train the policy, forward the reference).
    - DPO, precomputed: 6n (the reference ran before training, outside the timing, on both sides).
    - PPO: 2n (sampling: prefill and one decode step per token) + 2n (reference) + 2s (reward) + 2s (the critic's
      old values) + epochs · 6(n + s) (train policy and critic). The policy's old log-probs are not charged: TRL
      reads them off the sampling logits, lit-rlhf runs one more policy forward for them.
    """
    n, s = assets.causal_lm_flop_params, assets.scalar_head_flop_params
    if phase.is_ppo:
        return 2 * n + 2 * n + 2 * s + 2 * s + phase.ppo_epochs * 6 * (n + s)
    return {"sft": 6 * n, "rm": 6 * s, "dpo": 8 * n, "dpo_precomputed": 6 * n}[phase.key]


FLOPS_FOOTER = (
    "MFU = model FLOP/s ÷ the matmul peak. Model FLOPs = (6·N training, 2·N forward only) × non-padding tokens: "
    "SFT 6n, reward model 6s, DPO 6n + 2n (reference), DPO precomputed 6n, PPO 2n (sampling) + 2n (reference) + "
    "2s (reward) + 2s (values) + epochs·6(n + s); n = {n:,} causal-LM and s = {s:,} scalar-head parameters "
    "(position table out, tied embedding counted once as the LM head)."
)


def matmul_peak_gflops(threads: int, accelerator: str = "cpu", precision: str = "32-true") -> float:
    """The best ``torch.mm`` rate of a few large square products, in the runs' compute dtype
    (:func:`compute_dtype`), on the CPU at the bench's thread count or on the GPU: the ceiling that MFU divides by."""
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if accelerator == "gpu" else "cpu"
    dtype = getattr(torch, compute_dtype(precision))
    sizes = (4096, 8192) if device == "cuda" else (2048, 3072)
    best = 0.0
    for size in sizes:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        for repeat in range(4):  # the first is a warm-up: first-call allocation and kernel selection
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            if repeat:
                best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
    return best


def compute_dtype(precision: str) -> str:
    """The dtype the matrix products of a Lightning precision run in."""
    return {"bf16": "bfloat16", "16": "float16"}.get(precision.split("-")[0], "float32")


# --- reading the lit-rlhf config files ---------------------------------------------------------------------------


def _model_arguments(config_file: str) -> dict:
    import yaml

    config = yaml.safe_load((CONFIGS_DIR / config_file).read_text())
    return (config.get("model") or {}).get("init_args") or {}


def config_setting(config_file: str, path: str, default=None):
    """The value of a model setting in a config file, by its dotted path (``optimizer.learning_rate``)."""
    value = _model_arguments(config_file)
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


def peer_hyperparameters(phase: Phase) -> dict:
    """The lit-rlhf config's settings that TRL takes too, so both sides train at the same rates and coefficients.
    Settings a config leaves at the module's default are TRL's defaults too (weight decay 0; PPO's γ 1, λ 0.95,
    clip ranges 0.2)."""
    config = phase.config
    values = {
        "learning_rate": config_setting(config, "optimizer.learning_rate"),
        "warmup_steps": config_setting(config, "optimizer.warmup_steps", default=0),
        "weight_decay": config_setting(config, "optimizer.weight_decay", default=0.0),
    }
    if phase.key == "rm":
        values["center_rewards_coefficient"] = config_setting(config, "center_rewards_coefficient")
    if phase.key in ("dpo", "dpo_precomputed"):
        values["beta"] = config_setting(config, "beta")
        values["loss_type"] = config_setting(config, "loss_type", default="sigmoid")
    if phase.is_ppo:
        values["kl_coef"] = config_setting(config, "kl_control.beta")
        values["vf_coef"] = config_setting(config, "update.vf_coef")
        values["num_minibatches"] = config_setting(config, "update.num_minibatches", default=1)
        values["temperature"] = config_setting(config, "sampling.temperature", default=1.0)
    return values


def lit_arguments(phase: Phase, settings: dict[str, object], fsdp: bool = False) -> list[str]:
    """The ``lit-rlhf fit`` command line of one run: the phase's config file, ``configs/trainer/fsdp.yaml`` with
    ``fsdp`` (FSDP2 on the one device), and :data:`LIT_CLI_OVERRIDES`."""
    arguments = ["fit", "--config", str(CONFIGS_DIR / phase.config)]
    if fsdp:
        arguments += ["--config", str(CONFIGS_DIR / "trainer" / "fsdp.yaml")]
    for flag, template in {**LIT_CLI_OVERRIDES["every phase"], **LIT_CLI_OVERRIDES[phase.overrides_key]}.items():
        arguments.append(f"{flag}={template.format(**settings)}")
    return arguments


# --- running one side of one phase -------------------------------------------------------------------------------


@dataclass
class RunResult:
    phase: str
    side: str
    ok: bool
    data: dict
    log: Path


def peer_python(phase: Phase) -> Path:
    return BENCH_DIR / phase.peer_venv / "bin" / "python"


def subprocess_environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),  # both sides' torch at the same thread count as the matmul peak
        MKL_NUM_THREADS=str(threads),
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",  # everything is local: no hub look-ups inside the timing
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def run_side(side: str, phase: Phase, assets: Assets, options, pass_dir: Path) -> RunResult:
    """One subprocess: ``lit-rlhf fit`` with the project's python, or bench.peer_trl with the peer venv's."""
    run_dir = pass_dir / f"{phase.key}-{side}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path, log_path = run_dir / "result.json", run_dir / "log.txt"
    scratch = Path(tempfile.mkdtemp(prefix=f"{phase.key}-{side}-", dir=run_dir))
    case = assets.case
    steps = options.steps or phase.default_steps
    rows = steps * options.batch_size
    if phase.is_ppo:  # lit-rlhf holds out a share of the prompts (data.val_fraction, 0.05 by default)
        rows = math.ceil(rows / 0.9) + 1
    data = assets.data_file(phase.data, rows)
    policy = assets.policy_no_eos if phase.is_ppo else assets.policy
    response_length = case.ppo_response_length if phase.is_ppo else 0

    if side == "lit-rlhf":
        minibatches = config_setting(phase.config, "update.num_minibatches", default=1)
        callback = {
            "class_path": "bench.lit_callback.SteadyStateThroughput",
            "init_args": {"result_path": str(result_path), "phase": phase.key, "unit": phase.unit,
                          "warmup_steps": options.warmup_steps, "response_length": response_length},
        }
        settings = dict(
            policy=policy, reward=assets.reward, data=data, batch_size=options.batch_size,
            max_length=case.max_length, max_prompt_length=case.max_prompt_length,
            # lit-rlhf's max_steps counts optimiser steps; a PPO iteration makes epochs × minibatches of them
            lit_max_steps=steps * (phase.ppo_epochs * minibatches if phase.is_ppo else 1),
            response_length=response_length, ppo_epochs=phase.ppo_epochs, scratch=scratch,
            timing_callback=json.dumps(callback), accelerator=options.accelerator, precision=options.precision,
        )
        command = [sys.executable, "-m", "lit_rlhf", *lit_arguments(phase, settings, options.fsdp)]
        env = subprocess_environment(options.threads) | {"LIT_RLHF_RUNS_DIR": str(scratch / "runs")}
    else:
        command = [
            str(peer_python(phase)), "-m", "bench.peer_trl", "--phase", phase.peer_phase,
            "--model", str(policy), "--reward-model", str(assets.reward), "--data", str(data),
            "--steps", str(steps), "--warmup-steps", str(options.warmup_steps),
            "--batch-size", str(options.batch_size), "--max-length", str(case.max_length),
            "--response-length", str(response_length), "--ppo-epochs", str(phase.ppo_epochs or 1),
            "--hparams", json.dumps(peer_hyperparameters(phase)),
            "--output-dir", str(scratch / "trainer"), "--result", str(result_path),
        ]
        env = subprocess_environment(options.threads)

    with log_path.open("w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    shutil.rmtree(scratch, ignore_errors=True)  # exports and trainer output: only the result and the log are kept
    ok = completed.returncode == 0 and result_path.exists()
    data = json.loads(result_path.read_text()) if result_path.exists() else {}
    ok = ok and bool(data.get("throughput"))
    return RunResult(phase.key, side, ok, data, log_path)


def describe(result: RunResult, unit: str) -> str:
    if not result.ok:
        tail = result.log.read_text().strip().splitlines()[-1:] if result.log.exists() else []
        return f"FAILED ({tail[0][:160] if tail else 'no output'}; log: {result.log})"
    data = result.data
    gpu = f", peak GPU memory {data['peak_gpu_mib']:,.0f} MiB" if data.get("peak_gpu_mib") else ""
    return (f"{data['throughput']:,.1f} {UNITS[unit]} ({data['timed_steps']} timed steps, {data['seconds']:.1f} s, "
            f"peak RSS {data['peak_rss_mib']:,.0f} MiB{gpu})")


# --- the table ---------------------------------------------------------------------------------------------------


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def _per_pass(values: list[str]) -> str:
    return " / ".join(values) if values else "—"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def compute_setting(options) -> str:
    """The runs' precision and device in words: "fp32, CPU" by default."""
    precision = "fp32" if options.precision == "32-true" else options.precision
    device = "GPU" if options.accelerator == "gpu" else "CPU"
    return f"{precision}, {device}" + (", FSDP2 on one device" if options.fsdp else "")


def peers_comparable(options) -> bool:
    """TRL runs only in the default setting: its venvs hold CPU builds of torch, and its trainers are given
    lit-rlhf's fp32 (bench/README.md)."""
    return options.accelerator == "cpu" and options.precision == "32-true" and not options.fsdp


def _gpu_model() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def table(results: list[RunResult], phases: list[Phase], assets: Assets, peak: float, options,
          load_averages: tuple[float, float]) -> str:
    by_key: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        by_key.setdefault((result.phase, result.side), []).append(result)
    case = assets.case
    on_gpu = options.accelerator == "gpu"
    memory_key, memory_label = ("peak_gpu_mib", "peak GPU memory") if on_gpu else ("peak_rss_mib", "peak RSS")
    lines = [
        f"### lit-rlhf vs TRL: {case.name} case ({assets.parameters / 1e6:.1f}M-parameter GPT-2, "
        f"{case.vocab_size:,}-token vocabulary, {case.max_length}-token sequences), batch {options.batch_size}, "
        f"{compute_setting(options)}, {options.passes} pass(es)",
        "",
        "| phase | peer (TRL) | unit | lit-rlhf per pass | peer per pass | lit ÷ peer per pass | MFU lit | MFU peer "
        f"| {memory_label} lit | {memory_label} peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in phases:
        lit, peer = by_key.get((phase.key, "lit-rlhf"), []), by_key.get((phase.key, "trl"), [])
        lit_rates = [r.data["throughput"] if r.ok else None for r in lit]
        peer_rates = [r.data["throughput"] if r.ok else None for r in peer]
        ratios = [
            f"{a / b:.2f}" if a and b else "—" for a, b in zip(lit_rates, peer_rates)
        ] if peer else []

        def mfu(runs: list[RunResult]) -> str:
            rates = [r.data["tokens"] / r.data["seconds"] for r in runs if r.ok]
            if not rates:
                return "—"
            return f"{statistics.median(rates) * flops_per_token(phase, assets) / (peak * 1e9):.1%}"

        def memory(runs: list[RunResult]) -> str:
            values = [r.data[memory_key] for r in runs if r.ok and r.data.get(memory_key)]
            return f"{max(values):,.0f} MiB" if values else "—"

        lines.append(
            f"| {phase.label} | {phase.peer_label} | {UNITS[phase.unit]} "
            f"| {_per_pass([_fmt_rate(v) if v else 'failed' for v in lit_rates])} "
            f"| {_per_pass([_fmt_rate(v) if v else 'failed' for v in peer_rates]) if peer else 'not run'} "
            f"| {_per_pass(ratios)} | {mfu(lit)} | {mfu(peer)} | {memory(lit)} | {memory(peer)} |"
        )
    versions: dict[str, dict] = {}
    for result in results:
        if result.data.get("versions"):
            label = "lit-rlhf" if result.side == "lit-rlhf" else PHASES[result.phase].peer_venv.lstrip(".")
            versions.setdefault(label, result.data["versions"])
    threads = {r.data.get("threads") for r in results if r.ok}
    steps = {phase.key: options.steps or phase.default_steps for phase in phases}
    lines += [
        "",
        f"Throughput over steady-state steps: of each run's steps ({', '.join(f'{k} {v}' for k, v in steps.items())}; "
        f"PPO: iterations) the first {options.warmup_steps} are warm-up and not timed. Passes ran interleaved, "
        "lit-rlhf then peer, each run in its own process. "
        + ("Peak GPU memory: torch.cuda.max_memory_allocated" if on_gpu else "Peak RSS: ru_maxrss")
        + " when training ends.",
        FLOPS_FOOTER.format(n=assets.causal_lm_flop_params, s=assets.scalar_head_flop_params)
        + f" Peak: {peak:,.1f} GFLOP/s (best {compute_dtype(options.precision)} torch.mm, "
        + (f"{_gpu_model()})." if on_gpu else f"{options.threads} threads)."),
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}. "
        f"Machine: {os.cpu_count()} cores ({options.threads} used; torch threads in the runs: "
        f"{', '.join(map(str, sorted(t for t in threads if t)))}), {_cpu_model()}, Python {platform.python_version()}; "
        f"1-minute load average {load_averages[0]:.1f} before the runs, {load_averages[1]:.1f} after (above the "
        "thread count, something else was running and the timings are unreliable).",
        "Versions: " + "; ".join(
            f"{label}: " + ", ".join(f"{name} {value}" for name, value in sorted(found.items()))
            for label, found in versions.items()
        ) + ".",
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {', '.join(PHASES)} (default: all)")
    parser.add_argument("--passes", type=int, default=2, help="interleaved passes over the phases (default: 2)")
    parser.add_argument("--steps", type=int,
                        help="steps per run, warm-up included (PPO: iterations); default per phase: "
                        + ", ".join(f"{p.key} {p.default_steps}" for p in PHASES.values()))
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing (default: 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows (pairs, prompts) per step (default: 8)")
    parser.add_argument("--large", action="store_true",
                        help=f"the large case: ~30M parameters, {LARGE.vocab_size:,}-token vocabulary, "
                        f"{LARGE.max_length}-token sequences (default: the small case, ~10M, {SMALL.vocab_size:,}, "
                        f"{SMALL.max_length})")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of every run and of the peak measurement (default: the usable cores)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached model, tokenizer and data")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                        help="where lit-rlhf runs (default: cpu); TRL runs only on the CPU in fp32")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed", "bf16-true", "16-mixed"),
                        help="lit-rlhf's Lightning precision (default: 32-true); MFU is against the matmul peak "
                        "in its compute dtype")
    parser.add_argument("--fsdp", action="store_true",
                        help="lit-rlhf under FSDP2 on its one device (configs/trainer/fsdp.yaml)")
    options = parser.parse_args(argv)
    unknown = [key for key in options.phases.split(",") if key not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}: choose from {', '.join(PHASES)}")
    if options.steps is not None and options.steps <= options.warmup_steps:
        parser.error(f"--steps must exceed --warmup-steps ({options.warmup_steps}) to leave steps to time")
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    phases = [PHASES[key] for key in options.phases.split(",")]
    assets = load_or_build(CASES["large" if options.large else "small"], rebuild=options.rebuild)

    missing = sorted({phase.peer_venv for phase in phases if not peer_python(phase).exists()})
    if not peers_comparable(options):
        print(f"{compute_setting(options)}: the lit-rlhf side only (TRL runs fp32 on the CPU)", flush=True)
    elif missing:
        print(f"peer venvs missing ({', '.join('bench/' + name for name in missing)}): run `bash bench/setup_peers.sh`"
              "; running the lit-rlhf side only for their phases", flush=True)

    load_before = os.getloadavg()[0]
    peak = matmul_peak_gflops(options.threads, options.accelerator, options.precision)
    print(f"matmul peak ({compute_setting(options)}): {peak:,.1f} GFLOP/s at {options.threads} threads", flush=True)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_dir = CACHE_DIR / "runs" / f"{stamp}-{assets.case.name}"
    results: list[RunResult] = []
    for pass_index in range(1, options.passes + 1):
        pass_dir = runs_dir / f"pass{pass_index}"
        for phase in phases:
            sides = ["lit-rlhf"] + (["trl"] if peers_comparable(options) and peer_python(phase).exists() else [])
            for side in sides:
                started = time.perf_counter()
                result = run_side(side, phase, assets, options, pass_dir)
                results.append(result)
                print(f"[pass {pass_index}/{options.passes}] {phase.key:<16} {side:<8} {describe(result, phase.unit)}"
                      f" [{time.perf_counter() - started:.0f} s wall]", flush=True)

    report = table(results, phases, assets, peak, options, (load_before, os.getloadavg()[0]))
    (runs_dir / "table.md").write_text(report + "\n")
    print("\n" + report)
    print(f"\n(results, logs and this table: {runs_dir})")


if __name__ == "__main__":
    main()
