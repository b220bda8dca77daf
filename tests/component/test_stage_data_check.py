"""The launcher and PPO's controller check a resumed run's source files before Ray starts: a run directory
whose recorded files differ from today's is refused with the file's name (data/fingerprint.py). Real model
cache (tiny) and tokenizer; nothing is trained."""

import json

import pytest

from unipipe_ray.config import ConfigError, PPOConfig, SFTConfig, load_config, to_dict

SFT_ROW = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
PROMPT_ROW = {"messages": [{"role": "user", "content": "2+2?"}]}


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_run_started_on_other_data_is_refused_before_ray_starts(tmp_path, stage, monkeypatch):
    import ray

    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps(SFT_ROW if stage == "sft" else PROMPT_ROW) for _ in range(8)) + "\n")
    out = tmp_path / "out"
    overrides = ["model=tiny", f"output_dir={out}", f"data.sources=[{{path: {src}}}]", "data.eval_size=2"]
    if stage == "sft":
        from unipipe_ray.stages.sft import run_sft as run
        cfg = load_config(SFTConfig, overrides=overrides)
    else:
        from unipipe_ray.ppo.controller import run_ppo as run
        cfg = load_config(PPOConfig, overrides=overrides + ["rule_reward=tests.ray.rules:low_id_share"])
    out.mkdir()
    (out / f"{stage}_config.json").write_text(json.dumps(to_dict(cfg)))  # the same config as the first start
    (out / f"{stage}_data.json").write_text(json.dumps({str(src): "0" * 64}))  # but the file was other then
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the data check"))
    with pytest.raises(ConfigError, match=f"started on other data \\({src} changed\\)"):
        run(cfg)
