"""What a run shows while it goes: progress lines for logs with no terminal, and metric names for Ray's
Prometheus endpoint (the Ray test reading the endpoint back is tests/ray/test_metrics_ray.py)."""

import math

from unipipe_ray.runtime.logs import ProgressLines, duration, main_metric
from unipipe_ray.runtime.metrics import exportable, metric_name


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_carry_step_eta_and_the_main_metric_at_most_every_few_seconds():
    clock = Clock()
    lines = ProgressLines("sft", every_s=10, clock=clock)
    assert lines.line(0, 0, {}) is None  # no total yet: nothing to say
    assert lines.line(10, 100, {"sft/lr": 1e-3, "sft/loss": 2.5}) == "sft: step 10/100 (10%), loss 2.5"
    clock.now = 5
    assert lines.line(15, 100, {"sft/loss": 2.4}) is None  # too soon after the last line
    clock.now = 20  # 20 steps in 20 s since step 10: 1 step/s, 70 to go
    assert lines.line(30, 100, {"sft/eval_loss": 3.0, "sft/loss": 2.0}) == "sft: step 30/100 (30%), eta 1m10s, loss 2"
    assert lines.line(30, 100, {"sft/loss": 2.0}) is None  # the same step again
    clock.now = 21
    assert lines.line(100, 100, {"rm/accuracy": 0.75}) == "sft: step 100/100 (100%), accuracy 0.75"  # last: always


def test_a_resumed_run_counts_its_eta_from_where_it_resumed():
    clock = Clock()
    lines = ProgressLines("dpo", every_s=0, clock=clock)
    lines.line(500, 1000, {})
    clock.now = 100  # 100 steps in 100 s after resuming at 500
    assert lines.line(600, 1000, {}) == "dpo: step 600/1000 (60%), eta 6m40s"


def test_duration_and_main_metric():
    assert [duration(s) for s in (0, 59.6, 61, 3600 * 2 + 65)] == ["0s", "1m00s", "1m01s", "2h01m"]
    assert main_metric({"dpo/eval_loss": 1.0, "dpo/rewards_margin": 0.2, "dpo/loss": 0.6}) == ("loss", 0.6)
    assert main_metric({"ppo/policy_loss": 0.1}) == ("policy_loss", 0.1)
    assert main_metric({"sft/lr": 1.0}) is None


def test_metric_names_and_values_fit_prometheus():
    assert metric_name("sft/loss") == "unipipe_sft_loss"
    assert metric_name("ppo/phase/sync-s") == "unipipe_ppo_phase_sync_s"
    assert exportable({"watch/hacking": True, "ppo/kl": 0.5, "step": 3, "x": math.nan, "note": "text",
                       "ppo/inf": math.inf}) == {"unipipe_watch_hacking": 1.0, "unipipe_ppo_kl": 0.5,
                                                  "unipipe_step": 3.0}


def test_ray_trains_per_report_lines_are_kept_out_of_the_log():
    import logging

    from ray.train.v2._internal.execution import context

    from unipipe_ray.runtime.logs import quiet_ray_train_logs

    quiet_ray_train_logs()
    assert not context.logger.isEnabledFor(logging.INFO)  # "Reporting training result N: TrainingReport(...)"
    assert context.logger.isEnabledFor(logging.WARNING)
