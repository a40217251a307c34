"""``lit-rlhf report`` on hand-written pipeline and sweep folders in the exact formats those commands write, and its
W&B side with fakes at the network boundary."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

from lit_rlhf import report
from lit_rlhf.errors import ConfigError, DataError
from lit_rlhf.report import DASHBOARD_SECTIONS, build_report, log_report_to_wandb, publish_to_wandb, save_dashboard

POLICY_ROW = {"gold_reward": 0.611, "proxy_reward": 0.14, "kl": 0.0, "length_mean": 6.9, "length_ratio": 1.0,
              "sycophancy_rate": 0.05, "format_rate": 0.01, "repetition_rate": 0.02, "proxy_gap": 0.0}


def write_metrics_csv(log_dir: Path, hparams: str, evals: int = 4) -> None:
    """A CSVLogger ``metrics.csv``: training rows with ``train/loss`` and PPO's per-iteration metrics between
    evaluation rows where KL grows, proxy reward keeps rising and gold reward rises then falls (over-optimisation)."""
    log_dir.mkdir(parents=True)
    (log_dir / "hparams.yaml").write_text(hparams)
    columns = ["epoch", "step", "train/loss", "eval/gold/reward", "eval/proxy/reward", "eval/objective/kl",
               "eval/response/length_mean", "eval/hacking/length_ratio", "eval/hacking/sycophancy_rate",
               "eval/hacking/format_rate", "eval/hacking/repetition_rate", "eval/gold/proxy_gap", "policy/approxkl",
               "policy/clipfrac", "objective/kl", "value/explained_variance", "loss/value"]
    with open(log_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        for index in range(evals):
            step = 10 * index
            writer.writerow({"epoch": 0, "step": step, "train/loss": 1.0 / (index + 1), "policy/approxkl": 0.01,
                             "policy/clipfrac": 0.05, "objective/kl": 0.3 * index, "value/explained_variance": 0.4,
                             "loss/value": 0.2})
            gold, proxy = 0.5 + 0.1 * index - 0.05 * index**2, 0.1 + 0.2 * index
            writer.writerow({"epoch": 0, "step": step, "eval/gold/reward": gold, "eval/proxy/reward": proxy,
                             "eval/objective/kl": 0.3 * index - 0.01, "eval/response/length_mean": 7 + index,
                             "eval/hacking/length_ratio": 1 + 0.1 * index, "eval/hacking/sycophancy_rate": 0.05 * index,
                             "eval/hacking/format_rate": 0.02 * index, "eval/hacking/repetition_rate": 0.01,
                             "eval/gold/proxy_gap": proxy - gold})


@pytest.fixture
def pipeline_dir(tmp_path) -> Path:
    out = tmp_path / "pipeline_run"
    summary = [{"stage": "init", **POLICY_ROW, "gold_reward": 0.2, "kl": 1.5, "seconds": 0.0},
               {"stage": "sft", **POLICY_ROW, "seconds": 18.8},
               {"stage": "collect", "pairs": 120, "ties_dropped": 3, "gold_agreement": 0.8, "seconds": 4.0},
               {"stage": "rm", "accuracy": 0.71, "gold_accuracy": 0.66, "length_corr": 0.12, "seconds": 9.0},
               {"stage": "ppo", **POLICY_ROW, "gold_reward": 0.7, "proxy_reward": None, "kl": 0.4, "seconds": 41.0},
               {"stage": "dpo", **POLICY_ROW, "gold_reward": 0.65, "kl": 0.3, "seconds": 30.0},
               {"stage": "best_of_n", **POLICY_ROW, "gold_reward": 0.68, "kl": 0.9, "n": 4, "seconds": 2.0}]
    out.mkdir()
    (out / "summary.json").write_text(json.dumps(summary))
    kinds = {"sft": ("fit", "policy"), "collect": ("collect", "data"), "rm": ("fit", "reward_model"),
             "ppo": ("fit", "policy"), "dpo": ("fit", "policy"), "best_of_n": ("best_of_n", "baseline")}
    for stage, (kind, role) in kinds.items():
        (out / stage).mkdir()
        (out / stage / "done.json").write_text(json.dumps({"kind": kind, "role": role, "seconds": 1.0}))
    write_metrics_csv(out / "sft" / "sft" / "version_0", "learning_rate: 0.003\n")
    write_metrics_csv(out / "ppo" / "ppo" / "version_0", "init_kl_coef: 9.0\n")  # superseded by version_10
    write_metrics_csv(out / "ppo" / "ppo" / "version_10", "_class_path: lit_rlhf.phases.ppo.PPOModule\n"
                                                          "init_kl_coef: 0.5\nshape: !!python/tuple [1, 2]\n")
    write_metrics_csv(out / "dpo" / "dpo" / "version_0", "beta: 0.1\nloss_type: sigmoid\n")
    rm_log = out / "rm" / "rm" / "version_0"
    rm_log.mkdir(parents=True)
    (rm_log / "hparams.yaml").write_text("_class_path: lit_rlhf.phases.reward.RewardModelModule\n")
    (rm_log / "metrics.csv").write_text("epoch,step,train/loss,val/accuracy,val/gold/accuracy\n"
                                        "0,5,0.7,,\n0,9,,0.61,0.58\n1,19,,0.71,0.66\n")
    samples = [{"stage": "ppo", "prompt": f"question {i}", "response": "<b>bold</b> answer", "gold": 0.67,
                "proxy": None} for i in range(6)]
    (out / "eval_samples.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    return out


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    out = tmp_path / "sweep_run"
    trials = []
    for index, beta in enumerate((2.0, 0.3)):
        name = f"t0{index + 1}_init_kl_coef={beta}"
        write_metrics_csv(out / name / "ppo" / "version_0", f"init_kl_coef: {beta}\n")
        trials.append({"trial": name, "params": {"model.init_kl_coef": beta}, "status": "done", "seconds": 41.2,
                       "log_dir": f"{name}/ppo/version_0",
                       "metrics": {**POLICY_ROW, "gold_reward": 0.7 - 0.1 * index, "kl": 0.4 + index}})
    (out / trials[0]["log_dir"] / "samples.jsonl").write_text("".join(
        json.dumps({"iteration": i, "prompt": "p", "response": f"sampled answer {i}", "score": 0.3, "gold": 0.5}) + "\n"
        for i in range(6)) + '{"iteration": 6, "prom')
    trials.append({"trial": "t03_init_kl_coef=0.01", "params": {"model.init_kl_coef": 0.01}, "status": "failed",
                   "seconds": 3.0, "log_dir": "t03_init_kl_coef=0.01/ppo/version_0"})
    baselines = [{"stage": "best_of_n", "n": n, **POLICY_ROW, "gold_reward": 0.6 + 0.02 * n, "kl": 0.1 * n}
                 for n in (1, 2, 4, 8, 16)]
    (out / "sweep.json").write_text(json.dumps({
        "name": "ppo_beta", "file": "sweeps/ppo_beta.yaml", "method": "grid", "phase": "ppo",
        "parameters": ["model.init_kl_coef"], "trials": trials, "baselines": baselines,
        "reference": {"stage": "sft", **POLICY_ROW}}))
    return out


def assert_self_contained_page(index: Path, figures: int = 3) -> str:
    """The page embeds every PNG written beside it (at least ``figures``) and loads nothing from the network."""
    page = index.read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)=['"]?https?://""", page)
    pngs = sorted(index.parent.glob("*.png"))
    assert len(pngs) >= figures
    for png in pngs:
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    assert page.count("data:image/png;base64,") == len(pngs)
    return page


def test_pipeline_report_has_every_figure_the_summary_and_escaped_samples(pipeline_dir):
    report = build_report([pipeline_dir])
    assert report.html_path == pipeline_dir / "report" / "index.html"
    page = assert_self_contained_page(report.html_path)
    assert set(report.plots) == {"overoptimisation", "frontier", "ppo_health", "hacking", "reward_model"}
    labels = [curve.label for curve in report.folders[0].curves]
    assert labels == ["ppo (β=0.5)", "dpo (β=0.1)"]  # the newest version_N; SFT is not a β-run
    assert report.folders[0].rm_curves[0].rows[-1]["val/accuracy"] == pytest.approx(0.71)
    for value in ("0.611", "0.710", "0.660", "18.800", "120"):
        assert f"<td>{value}</td>" in page
    assert "<td>-</td>" in page  # ppo's null proxy reward
    assert "&lt;b&gt;bold&lt;/b&gt; answer" in page and "<b>bold</b>" not in page
    assert page.count("question ") == 4  # at most 4 samples per stage
    assert report.skipped == {"scaling_law": "no sweep folder has fitted Gao et al. forms (run a sweep with lit-rlhf "
                                             "sweep)",
                              "settings": "no sweep has a setting run under more than one seed"}  # sweeps' figures


def test_sweep_report_reads_trials_baselines_and_the_last_samples(sweep_dir, tmp_path):
    report = build_report([sweep_dir], tmp_path / "out")
    page = assert_self_contained_page(report.html_path)
    folder = report.folders[0]
    assert [curve.label for curve in folder.curves] == ["β=2", "β=0.3", "β=0.01"]
    assert [len(curve.rows) for curve in folder.curves] == [4, 4, 0]  # training-only rows are not evaluations
    assert [sample["iteration"] for sample in folder.samples["t01_init_kl_coef=2.0"]] == [2, 3, 4, 5]
    assert "<td>t03_init_kl_coef=0.01</td>" in page and "<td>failed</td>" in page
    assert "<td>best_of_n (n=16)</td>" in page and "<td>reference (sft)</td>" in page
    assert "sampled answer 5" in page and "sampled answer 1" not in page
    assert "Skipped reward_model: no reward-model stage in a pipeline summary.json." in page


def test_several_folders_share_one_page_with_their_names_in_the_labels(pipeline_dir, sweep_dir, tmp_path):
    report = build_report([pipeline_dir, sweep_dir], tmp_path / "both")
    page = assert_self_contained_page(report.html_path, figures=4)
    assert "<h3>pipeline_run (pipeline)</h3>" in page and "<h3>ppo_beta (sweep)</h3>" in page
    assert "<td>ppo_beta: β=0.3</td>" in page and "<td>pipeline_run: ppo</td>" in page  # the hacking table
    assert "<h3>pipeline_run: ppo</h3>" in page and "<h3>ppo_beta: t01_init_kl_coef=2.0</h3>" in page  # samples


def test_figures_without_their_data_are_skipped_with_the_reason(pipeline_dir, tmp_path):
    for log in pipeline_dir.glob("*/*/version_*/metrics.csv"):
        log.unlink()
    index = build_report([pipeline_dir], tmp_path / "no_curves").html_path
    page = assert_self_contained_page(index, figures=2)  # frontier and reward model come from summary.json
    assert sorted(path.name for path in index.parent.glob("*.png")) == ["frontier.png", "reward_model.png"]
    assert "Skipped overoptimisation: no metrics.csv has evaluation rows with eval/objective/kl and a reward." in page
    assert "Skipped hacking: no metrics.csv has eval/hacking/* columns." in page


def test_a_folder_without_results_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no summary.json or sweep.json"):
        build_report([tmp_path])


def test_a_damaged_summary_or_sweep_file_is_one_line(tmp_path):
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "summary.json").write_text('[{"stage": "sft", "gold_')
    with pytest.raises(DataError, match=r"cut/summary.json: not valid JSON \(Unterminated string .*\): run the "):
        build_report([tmp_path / "cut"])
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "sweep.json").write_text("[]")
    with pytest.raises(DataError, match=r"edited/sweep.json: expected a JSON object: run the command that wrote it"):
        build_report([tmp_path / "edited"])


class RecordingRun:
    def __init__(self):
        self.logged: list[dict] = []

    def log(self, payload: dict) -> None:
        self.logged.append(payload)


def test_log_report_to_wandb_logs_each_figure_and_the_summary_table(pipeline_dir, sweep_dir, tmp_path):
    import wandb

    report = build_report([pipeline_dir, sweep_dir], tmp_path / "both")
    run = RecordingRun()
    log_report_to_wandb(report, run)
    (payload,) = run.logged
    assert set(payload) == {f"report/{name}" for name in report.plots} | {"report/summary"}
    assert all(isinstance(payload[f"report/{name}"], wandb.Image) for name in report.plots)
    table = payload["report/summary"]
    assert table.columns[:2] == ["folder", "stage"] and "trial" in table.columns
    assert len(table.data) == 7 + 3 + 5 + 1  # stages, trials, baselines, reference
    log_report_to_wandb(report)  # no active run: nothing happens, nothing is started
    assert wandb.run is None


def test_publish_to_wandb_uses_the_active_run_else_an_offline_report_run(pipeline_dir, tmp_path, monkeypatch):
    import wandb

    report = build_report([pipeline_dir], tmp_path / "report")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    publish_to_wandb(report)
    assert not (report.out_dir / "wandb").exists()
    active = RecordingRun()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "run", active)
    publish_to_wandb(report)
    assert len(active.logged) == 1 and not (report.out_dir / "wandb").exists()
    monkeypatch.setattr(wandb, "run", None)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    publish_to_wandb(report)
    (run_dir,) = (report.out_dir / "wandb").glob("offline-run-*")
    assert (run_dir / "files" / "media" / "images").is_dir()
    assert wandb.run is None  # finished


def test_save_dashboard_saves_one_section_per_question(monkeypatch):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    saved_views, saved_workspaces = [], []
    original_save = ws.Workspace.save

    def recording_save(workspace):
        saved_workspaces.append(workspace)
        return original_save(workspace)

    def fake_upsert_view(view):
        saved_views.append(view)
        return {"upsertView": {"view": {"name": "abc123", "id": "view-1"}}}

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(internal, "upsert_view2", fake_upsert_view)
    monkeypatch.setattr(ws.Workspace, "save", recording_save)
    monkeypatch.setattr(ws.Workspace, "url", property(lambda self: f"https://wandb.test/{self.entity}/{self.project}"
                                                                   f"?nw={self._internal_name}"))
    url = save_dashboard("rlhf", entity="team")
    assert url == "https://wandb.test/team/rlhf?nw=abc123"
    (workspace,) = saved_workspaces
    assert (workspace.entity, workspace.project, workspace.name) == ("team", "rlhf", "lit-rlhf")
    assert [section.name for section in workspace.sections] == list(DASHBOARD_SECTIONS)
    lines = {section.name: [panel.y for panel in section.panels if isinstance(panel, wr.LinePlot)]
             for section in workspace.sections}
    assert lines["PPO"] == [[metric] for metric in DASHBOARD_SECTIONS["PPO"]]
    assert lines["Reward model"] == [["val/accuracy"], ["val/gold/accuracy"], ["val/reward/length_corr"]]
    scatter = workspace.sections[0].panels[-1]
    assert isinstance(scatter, wr.ScatterPlot) and (scatter.x, scatter.y) == ("eval/objective/kl", "eval/gold/reward")
    assert all(section.is_open for section in workspace.sections)
    assert len(saved_views) == 1 and saved_views[0].entity == "team"


def test_save_dashboard_needs_an_api_key_and_the_package(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs WANDB_API_KEY"):
        save_dashboard("rlhf", entity="team")
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    with pytest.raises(ConfigError, match=r'pip install "lit-rlhf\[sweeps\]"'):
        save_dashboard("rlhf", entity="team")


def test_a_training_curve_is_labelled_by_the_reward_it_was_trained_on():
    assert report._reward_of({"reward_model": "runs/pipeline/rm/hf"}) == "rm/hf"
    assert report._reward_of({"reward_model": "gold"}) == "gold"
    assert report._reward_of({"reward_model": "my_rewards.length:score"}) == "my_rewards.length:score"
    assert report._reward_of({}) is None


def test_runs_without_gold_get_no_gold_panels_or_columns(pipeline_dir, tmp_path, monkeypatch):
    panels, save = {}, report._save
    monkeypatch.setattr(report, "_save", lambda figure, path: panels.setdefault(path.stem, len(figure.axes))
                        and save(figure, path))
    summary = json.loads((pipeline_dir / "summary.json").read_text())
    for row in summary:
        for key in ("gold_reward", "gold_accuracy", "gold_agreement", "proxy_gap"):
            row.pop(key, None)
        row["proxy_scorer"] = "rm" if "proxy_reward" in row else None
    (pipeline_dir / "summary.json").write_text(json.dumps(summary))
    for metrics in pipeline_dir.glob("*/*/version_*/metrics.csv"):
        rows = list(csv.DictReader(metrics.open()))
        with open(metrics, "w", newline="") as handle:
            columns = [column for column in rows[0] if "gold" not in column]
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    built = build_report([pipeline_dir], tmp_path / "report")
    page = built.html_path.read_text()
    assert "gold_reward" not in page and "These runs have no gold reward" in page
    assert "proxy_scorer" in page and "Gold (left)" not in page
    assert panels["overoptimisation"] == 1 and panels["frontier"] == 1  # the training or proxy panel alone


def test_a_sweep_over_reward_models_draws_each_setting_over_its_seeds(sweep_dir, tmp_path):
    """sweeps/mitigations.yaml's groups: one point per reward model with its interval over seeds, named by the
    pipeline stage that made it, and a table of the groups with their hacking rates."""
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    def interval(mean: float) -> dict:
        return {"mean": mean, "ci95": [mean - 0.05, mean + 0.05], "n": 3}

    spec["groups"] = [
        {"params": {"model.reward_model": f"runs/pipeline/{name}/{folder}", "model.kl_control.beta": 0.01}, "seeds": 3,
         "gold_reward": interval(gold), "proxy_reward": interval(0.8), "kl": interval(4.0),
         "length_ratio": interval(1.3)}
        for name, folder, gold in (("rm", "hf", 0.4), ("rm_worst", "ensemble", 0.7))]
    (sweep_dir / "sweep.json").write_text(json.dumps(spec))
    report = build_report([sweep_dir], tmp_path / "out")
    assert "settings" in report.plots and report.plots["settings"].read_bytes().startswith(b"\x89PNG")
    page = report.html_path.read_text()
    for cell in ("rm_worst", "0.700 [0.650, 0.750]", "1.300 [1.250, 1.350]"):  # the stage, gold, length ratio
        assert f"<td>{cell}</td>" in page
