"""A stage's figures reach Ray's metrics endpoint (Prometheus text, what the dashboard's Metrics view, Grafana
and any Prometheus scrape read), tagged with the run and the stage."""

import re
import time
import urllib.request

import pytest

from unipipe_ray.config import SFTConfig, load_config
from unipipe_ray.stages.sft import run_sft

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    """(tags, value) of every sample of ``name`` in Prometheus' text format (Ray may prefix it with ray_)."""
    out = []
    for m in re.finditer(rf"^(?:ray_)?{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out.append((tags, float(m.group(2))))
    return out


def test_a_stage_s_loss_reaches_rays_prometheus_endpoint_with_its_tags(ray_cluster, tmp_path):
    out = tmp_path / "sft"
    cfg = load_config(SFTConfig, overrides=[
        "model=tiny", f"output_dir={out}", "data.task_size=40", "data.eval_size=4", "data.max_length=64",
        "train.batch_size=2", "train.max_steps=6", "train.log_every=1"])
    run_sft(cfg)
    from tests.ray.test_stages_ray import tensorboard_scalars

    losses = [v for _, v in tensorboard_scalars(out / "tensorboard")["sft/loss"]]
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray_cluster.nodes()
            if n["Alive"]]
    found, deadline = [], time.time() + 60
    while not found and time.time() < deadline:  # Ray's agent publishes what workers pushed every few seconds
        for url in urls:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            found += [(t, v) for t, v in samples(text, "unipipe_sft_loss") if t.get("run") == str(out)]
        if not found:
            time.sleep(1)
    assert found, f"no unipipe_sft_loss for run {out} at {urls}"
    tags, value = found[0]
    assert tags["stage"] == "sft" and tags["rank"] == "0"
    assert any(value == pytest.approx(loss, rel=1e-5) for loss in losses), (value, losses)  # a reported loss
