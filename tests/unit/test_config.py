"""Config loading: YAML + dotted overrides, with errors that name the file and the dotted key."""

import dataclasses

import pytest
import yaml

from unipipe_ray.config import (
    ConfigError,
    DPOConfig,
    PipelineConfig,
    SFTConfig,
    load_config,
    parse_override,
    to_dict,
)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "model: tiny\ntrain:\n  lr: 1e-4\n  lora: {enabled: true, r: 8}\n"
                        "data:\n  sources: [{path: a.jsonl, weight: 2}]\n")
    cfg = load_config(SFTConfig, p, ["train.max_steps=3", "data.max_length=64"])
    assert cfg.model == "tiny" and cfg.train.lr == 1e-4 and cfg.train.lora.r == 8
    assert cfg.train.max_steps == 3 and cfg.data.max_length == 64
    assert cfg.data.sources[0].path == "a.jsonl" and cfg.data.sources[0].weight == 2.0
    assert cfg.train.batch_size == SFTConfig().train.batch_size  # defaults fill the rest
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = "x"


def test_defaults_without_file():
    assert load_config(SFTConfig) == SFTConfig()
    assert load_config(DPOConfig).train.lr == 5e-7


@pytest.mark.parametrize("override, key, words", [
    ("train.lrr=1", "train.lrr", "unknown key"),
    ("train.lr=2", "train.lr", "must be in (0, 1)"),
    ("data.sources=[{path: x, weight: -1}]", "data.sources[0].weight", "must be > 0"),
    ("train.batch_size=true", "train.batch_size", "must be int"),
    ("data.task=foo", "data.task", "must be one of"),
    ("data.max_prompt_length=500", "data.max_prompt_length", "must be in (0, max_length"),
    ("train.zero_stage=4", "train.zero_stage", "must be one of 0, 1, 2, 3"),
    ("train.zero_stage=2", "train.zero_stage", "needs backend: deepspeed"),
    ("train.backend=fsdp", "train.backend", "must be one of ddp, deepspeed"),
])
def test_bad_values_name_file_and_key(tmp_path, override, key, words):
    p = write(tmp_path, "model: tiny\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p, [override])
    assert e.value.key == key
    assert str(p) in str(e.value) and key in str(e.value) and words in str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = write(tmp_path, "model: tiny\ndata:\n  max_lenght: 10\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*data\.max_lenght: unknown key \(known keys: task"):
        load_config(SFTConfig, p)


def test_bad_yaml_and_top_level(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(SFTConfig, write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(SFTConfig, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("train.lr")


def test_dpo_and_pipeline_validation():
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(DPOConfig, overrides=["label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="stages: must keep the order"):
        load_config(PipelineConfig, overrides=["stages=[dpo, sft]"])
    with pytest.raises(ConfigError, match="eval_dtype"):
        load_config(PipelineConfig, overrides=["eval_dtype=float16"])
    cfg = load_config(PipelineConfig, overrides=["stages=[sft, dpo]", "dpo.beta=0.5", "eval_dtype=auto"])
    assert cfg.stages == ("sft", "dpo") and cfg.dpo.beta == 0.5 and cfg.eval_dtype == "auto"


def test_to_dict_round_trips(tmp_path):
    cfg = load_config(SFTConfig, overrides=["data.sources=[{path: a.jsonl}]", "train.lora.enabled=true"])
    tree = to_dict(cfg)
    assert tree["data"]["sources"] == [{"path": "a.jsonl", "weight": 1.0}]
    assert load_config(SFTConfig, write(tmp_path, yaml.safe_dump(tree))) == cfg


def test_resuming_with_a_changed_config_is_refused(tmp_path):
    from unipipe_ray.runtime.launch import check_same_config

    cfg = to_dict(load_config(SFTConfig, overrides=["train.lr=1e-4"]))
    check_same_config(tmp_path / "sft_config.json", cfg)
    check_same_config(tmp_path / "sft_config.json", cfg)  # same config: resume is fine
    changed = to_dict(load_config(SFTConfig, overrides=["train.lr=2e-4"]))
    with pytest.raises(ValueError, match=r"different config \(train\.lr: 0\.0001 -> 0\.0002\)"):
        check_same_config(tmp_path / "sft_config.json", changed)


def test_the_report_cannot_ask_for_more_held_out_examples_than_a_section_holds_out():
    """eval_size 40 with sft.data.eval_size 32 would score 8 examples the SFT stage trained on."""
    from unipipe_ray.config import PipelineConfig

    with pytest.raises(ConfigError, match=r"eval_size: 40 is more than the 32 examples sft.data holds out"):
        load_config(PipelineConfig, None, ["eval_size=40", "sft.data.eval_size=32"])
    with pytest.raises(ConfigError, match=r"the 16 examples dpo.data holds out"):
        load_config(PipelineConfig, None, ["eval_size=32", "dpo.data.eval_size=16"])
    assert load_config(PipelineConfig, None, ["eval_size=32", "sft.data.eval_size=32"]).eval_size == 32


def test_the_public_config_api_reads_the_file_once_for_config_and_given_keys(tmp_path):
    """load_config_with_keys = (load_config, given_keys) from one read; build_config + set_dotted rebuild a config."""
    from unipipe_ray.config import PipelineConfig, build_config, given_keys, load_config_with_keys, set_dotted

    path = tmp_path / "p.yaml"
    path.write_text("model: tiny\ndpo:\n  model: my/dpo-init\n  train: {lr: 1.0e-6}\n")
    overrides = ["ppo.reward_model=rm-x", "rm={margin: 0.5}"]
    cfg, given = load_config_with_keys(PipelineConfig, path, overrides)
    assert cfg == load_config(PipelineConfig, path, overrides)
    assert given == given_keys(path, overrides) == {"model", "dpo", "dpo.model", "dpo.train", "dpo.train.lr",
                                                    "ppo.reward_model", "rm", "rm.margin"}
    tree = to_dict(cfg)
    set_dotted(tree, "dpo.beta", 0.5)
    assert build_config(PipelineConfig, tree).dpo.beta == 0.5
    set_dotted(tree, "dpo.beta", -1.0)
    with pytest.raises(ConfigError, match=r"^here: dpo.beta: must be > 0"):
        build_config(PipelineConfig, tree, source="here")
