"""The README's main job, end to end on the embedded world (slow: two to four minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lit_rlhf.cli import fit_phase
from lit_rlhf.held_out import SUMMARY_KEYS
from lit_rlhf.pipeline import run_pipeline
from lit_rlhf.report import publish_report

CONFIG = Path(__file__).parents[1] / "configs" / "pipeline.yaml"


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    started = time.perf_counter()
    rows = run_pipeline(CONFIG, fit_phase, out, then=publish_report)
    return {row["stage"]: row for row in rows}, time.perf_counter() - started, out


@pytest.mark.slow
def test_the_main_job_beats_sft_with_ppo_dpo_and_best_of_n_within_six_minutes(main_job):
    rows, seconds, _ = main_job
    assert seconds < 360  # 4 min 5 s on a slow day of the 2-core machine, about 2 min on a quiet one
    assert list(rows) == ["init", "sft", "collect", "rm", "ppo", "dpo", "best_of_n", "optimum"]
    sft = rows["sft"]["gold_reward"]
    assert sft > rows["init"]["gold_reward"] + 1.0
    for stage in ("ppo", "dpo", "best_of_n"):
        assert set(SUMMARY_KEYS) <= set(rows[stage])
        assert rows[stage]["gold_reward"] > sft + 0.05, stage
        assert 0 < rows[stage]["kl"] < 5, stage
        assert rows[stage]["gold_reward_se"] <= 0.015, stage  # 512 test prompts × 4 answers


@pytest.mark.slow
def test_the_main_jobs_ppo_stays_within_the_health_limits_at_every_iteration(main_job):
    rows, _, out = main_job
    assert rows["ppo"]["health_breaches"] == 0
    assert json.loads((out / "ppo" / "health.json").read_text()) == []


@pytest.mark.slow
def test_the_main_jobs_optimum_is_estimated_and_paired_differences_written(main_job):
    rows, _, out = main_job
    optimum = rows["optimum"]
    assert "refused" not in optimum and optimum["ess"] >= 8
    assert 0 < optimum["kl"] < 5 and optimum["gold_reward"] > rows["sft"]["gold_reward"]
    paired = json.loads((out / "paired.json").read_text())
    assert {(row["a"], row["b"], row["metric"]) for row in paired} >= {("ppo", "sft", "gold_reward")}


@pytest.mark.slow
def test_the_main_jobs_reward_model_reaches_the_accuracy_bar(main_job):
    """The bar at what the world's model learns (issue 3's evidence), as the main job (seed 0) measures it: 0.62
    against the raters' labels, 0.65 against gold. Measured on the ~3,070 pairs of SFT answers to the test prompts
    (standard error about 0.007), seed 0 gives 0.632 and 0.672 (the same on every run here); seeds 1 and 2 gave
    0.606 and 0.640 against the raters, 0.622 and 0.658 against gold, so the bar holds for seeds 0 and 2, not for
    seed 1 (README: over three seeds)."""
    rows, _, _ = main_job
    assert rows["rm"]["accuracy"] >= 0.62
    assert rows["rm"]["gold_accuracy"] >= 0.65
    # measured on every pair of different SFT answers to the 512 test prompts, against the raters' ceiling
    assert rows["rm"]["test_pairs"] >= 3000 and rows["rm"]["accuracy_se"] <= 0.01
    assert rows["rm"]["accuracy"] < rows["rm"]["rater_ceiling"] < 1


@pytest.mark.slow
def test_the_main_job_logs_hacking_metrics_and_writes_the_report(main_job):
    rows, _, out = main_job
    for stage in ("ppo", "dpo"):
        (metrics,) = (out / stage).glob("*/version_*/metrics.csv")
        header = metrics.read_text().splitlines()[0].split(",")
        assert len([name for name in header if "hacking/" in name]) >= 3, stage
    assert rows["sft"]["length_ratio"] == 1.0 and rows["sft"]["proxy_gap"] == 0.0  # the reference itself
    report = out / "report"
    assert (report / "index.html").is_file()
    assert len(list(report.glob("*.png"))) >= 3
