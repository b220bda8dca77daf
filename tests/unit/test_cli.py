"""The `unipipe` command's argument and config handling (no training: bad input stops before Ray starts)."""

import pytest

from unipipe_ray.cli import main


def test_bad_override_exits_2_naming_the_key(capsys):
    assert main(["dpo", "beta=-1"]) == 2
    err = capsys.readouterr().err
    assert "beta: must be > 0, got -1" in err


def test_missing_config_file_exits_2(capsys, tmp_path):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_unknown_stage_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        main(["ppo-typo"])
    assert e.value.code == 2


def test_an_unusable_output_dir_uri_is_named_before_anything_runs(capsys):
    assert main(["sft", "model=tiny", "output_dir=nosuch://bucket/sft"]) == 2
    assert "output_dir 'nosuch://bucket/sft' is not usable" in capsys.readouterr().err
