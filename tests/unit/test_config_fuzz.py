"""Config fuzz: every bad file or value is refused at load time with the file and the dotted key, through the
CLI with exit 2, fast (no Ray, no model). Each case here passed silently or raised a bare traceback before."""

import dataclasses
import re
import time
import typing

import pytest

from unipipe_ray.cli import main
from unipipe_ray.config import ConfigError, PipelineConfig, load_config, read_yaml
from unipipe_ray.config.reader import MAX_YAML_NODES


def float_keys(cls, prefix=""):
    """Every dotted key of a float field below ``cls`` (nested dataclasses included)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            yield from float_keys(tp, f"{prefix}{f.name}.")
        elif tp is float or args == [float]:
            yield f"{prefix}{f.name}"


FLOAT_KEYS = sorted(float_keys(PipelineConfig))


def test_the_walk_finds_the_float_keys_of_every_section():
    assert len(FLOAT_KEYS) >= 50
    for key in ("sft.train.epochs", "rm.margin", "dpo.simpo_gamma", "ppo.kl_target", "ppo.hacking_z",
                "dpo.sams.explore_weight", "sft.train.lora.dropout"):
        assert key in FLOAT_KEYS


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_key_refuses_a_non_finite_value(value):
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError) as e:
            load_config(PipelineConfig, None, [f"{key}={value}"])
        # the SamS section validates itself; the error names its section and the field
        assert key in str(e.value) or (".sams." in key and key.rsplit(".", 1)[0] in str(e.value)), key


@pytest.mark.parametrize("override, key", [
    ("sft.train.weight_decay=-0.1", "sft.train.weight_decay"),
    ("rm.margin=-1", "rm.margin"),
    ("dpo.simpo_gamma=-0.5", "dpo.simpo_gamma"),
    ("ppo.critic_lr=0", "ppo.critic_lr"),
    ("ppo.value_clip_eps=0", "ppo.value_clip_eps"),
    ("ppo.gold_reward_weight=-1", "ppo.gold_reward_weight"),
    ("ppo.missing_eos_penalty=-1", "ppo.missing_eos_penalty"),
    ("ppo.hacking_z=0", "ppo.hacking_z"),
    ("ppo.kl_target=0", "ppo.kl_target"),
    ("sft.train.epochs=.inf", "sft.train.epochs"),
    ("sft.train.lora.alpha=0", "sft.train.lora.alpha"),
    ("eval_max_new_tokens=0", "eval_max_new_tokens"),
    ("dpo.sams.dropout=1.5", "dpo.sams"),
    ("dpo.sams.explore_downsample=0", "dpo.sams"),
    ("sft.train={1: 2}", "sft.train.1"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, [override])
    assert e.value.key == key


def write(tmp_path, text, name="bad.yaml"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

BAD_FILES = {
    # what the file holds -> (the key the error names, words of the message)
    "duplicate": ("model: tiny\nsft:\n  train: {lr: 1.0e-4}\nsft:\n  data: {task: arith}\n",
                  "sft", "duplicate key (lines 2 and 4)"),
    "nested duplicate": ("sft:\n  train:\n    lr: 1.0e-4\n    lr: 2.0e-4\n", "sft.train.lr", "duplicate key"),
    "int key": ("model: tiny\n1: x\n", "1", "keys must be names"),
    "bool key": ("sft:\n  true: x\n", "sft.true", "keys must be names"),
    "alias bomb": (f"tune_space:\n  {BOMB.replace(chr(10), chr(10) + '  ')}", "tune_space.e", "expands to more than"),
    "recursive alias": ("a: &a\n  - *a\n", "a[0]", "recursive YAML alias"),
    "nan": ("sft:\n  train:\n    epochs: .nan\n", "sft.train.epochs", "must be a finite number"),
    "kl_target 0": ("ppo:\n  kl_target: 0\n", "ppo.kl_target", "must be > 0 or null"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_refused_naming_file_and_key(tmp_path, capsys, case):
    text, key, words = BAD_FILES[case]
    p = write(tmp_path, text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, p)
    assert e.value.key == key and words in e.value.message and str(p) in str(e.value)
    assert main(["run", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and key in err and words in err
    assert time.perf_counter() - start < 1.0


def test_a_directory_and_non_utf8_bytes_are_refused(tmp_path, capsys):
    for path, words in [(tmp_path, "is a directory"),
                        (write(tmp_path, b"model: tiny\nsft:\n  data: {task: \xff\xfe}\n"),
                         "is not UTF-8 text (line 3")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            read_yaml(path)
        for command in (["run"], ["sft"], ["tune"]):
            assert main(command + ["--config", str(path)]) == 2
            assert words in capsys.readouterr().err


def test_anchors_and_merge_keys_of_a_normal_size_still_work(tmp_path):
    p = write(tmp_path, "stages: [sft, dpo]\nsft:\n  data: &d {task: arith, eval_size: 40}\n"
                        "dpo:\n  data:\n    <<: *d\n    max_length: 128\n")
    cfg = load_config(PipelineConfig, p)
    assert cfg.dpo.data.eval_size == 40 and cfg.dpo.data.max_length == 128
    assert MAX_YAML_NODES >= 10_000
