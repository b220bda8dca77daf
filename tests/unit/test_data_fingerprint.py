"""The content of a stage's source files, recorded at its start: an edited file refuses a resume (launcher,
PPO) and reruns a finished stage of the chain instead of skipping it."""

import json

import pytest

from unipipe_ray.config import ConfigError, DataConfig, PipelineConfig, load_config, to_dict
from unipipe_ray.data.fingerprint import data_changes, fingerprint
from unipipe_ray.pipeline.chain import stage_config
from unipipe_ray.pipeline.manifest import Manifest
from unipipe_ray.pipeline.run import plan
from unipipe_ray.runtime.launch import check_same_data

ROW = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def data(tmp_path, *files) -> DataConfig:
    return load_config(DataConfig, overrides=[f"sources=[{', '.join(f'{{path: {tmp_path / f}}}' for f in files)}]"])


def test_files_directories_and_hub_names_are_fingerprinted(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "data.arrow").write_bytes(b"arrow")
    cfg = load_config(DataConfig, overrides=[
        f"sources=[{{path: {tmp_path / 'a.jsonl'}}}, {{path: {tmp_path / 'saved'}}}, {{path: 'hf:org/set'}}]"])
    files = fingerprint(cfg)
    assert set(files) == {str(tmp_path / "a.jsonl"), str(tmp_path / "saved" / "data.arrow"), "hf:org/set"}
    assert files["hf:org/set"] == "hub dataset (not hashed)" and len(files[str(tmp_path / "a.jsonl")]) == 64
    assert fingerprint(load_config(DataConfig, overrides=["task=arith"])) == {}  # generated: the config says all
    gsm = load_config(DataConfig, overrides=["task=gsm8k", f"task_path={tmp_path / 'a.jsonl'}"])
    assert list(fingerprint(gsm)) == [str(tmp_path / "a.jsonl")]


def test_changes_are_named():
    assert data_changes({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"}) == [
        "b changed", "d added", "c removed"]
    assert data_changes({"a": "1"}, {"a": "1"}) == []


def test_a_resume_over_an_edited_source_is_refused_and_the_record_stays(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(ROW) + "\n")
    record = tmp_path / "run" / "sft_data.json"
    check_same_data(record, data(tmp_path, "a.jsonl"))  # the first start writes it
    first = record.read_text()
    check_same_data(record, data(tmp_path, "a.jsonl"))  # unchanged: resumes
    src.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")
    with pytest.raises(ConfigError, match=f"run started on other data \\({src} changed\\); resuming it would"):
        check_same_data(record, data(tmp_path, "a.jsonl"))
    assert record.read_text() == first


def test_the_chain_reruns_a_finished_stage_whose_file_changed(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(ROW) + "\n")
    cfg = load_config(PipelineConfig, overrides=[f"run_dir={tmp_path}/run", "stages=[sft]",
                                                 f"sft.data.sources=[{{path: {src}}}]"])
    sft = stage_config(cfg, "sft", {}, set())
    m, conf = Manifest(tmp_path / "run"), to_dict(sft)
    m.start("sft", conf, fingerprint(sft.data))
    (tmp_path / "ckpt").mkdir()
    m.finish("sft", {"checkpoint": str(tmp_path / "ckpt"), "metrics": {}, "seconds": 1})
    assert plan(m, "sft", conf, False, data_files=fingerprint(sft.data))[0] == "skip"
    src.write_text("")
    assert plan(m, "sft", conf, False, data_files=fingerprint(sft.data)) == (
        "run", f"its data changed ({src} changed)")
    del m.data["stages"]["sft"]["data_files"]  # a manifest from before files were recorded: nothing to compare
    assert plan(m, "sft", conf, False, data_files=fingerprint(sft.data))[0] == "skip"
