"""read_raw on every supported format, and the errors for bad files naming file and line."""
import gzip
import json

import pytest

from unipipe_ray.data import DataError, read_raw

ROWS = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def read(path) -> list:
    return list(read_raw(path))


def test_jsonl_and_gz_with_line_locations(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(ROWS[:1]) + b"\n" + jsonl_bytes(ROWS[1:]))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(ROWS)))
    got = read(tmp_path / "a.jsonl")
    assert [r for _, r in got] == ROWS
    assert got[1][0] == f"{tmp_path / 'a.jsonl'}:3"  # 1-based, blank line 2 skipped but counted
    assert [r for _, r in read(tmp_path / "a.jsonl.gz")] == ROWS


def test_json_list_and_gz(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    got = read(tmp_path / "a.json")
    assert [r for _, r in got] == ROWS and got[1][0].endswith("a.json[record 1]")
    assert [r for _, r in read(tmp_path / "a.json.gz")] == ROWS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    assert [r for _, r in read(tmp_path / "a.parquet")] == ROWS


def test_saved_dataset_and_single_split_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    got = read(tmp_path / "ds")
    assert [r for _, r in got] == ROWS and got[0][0].endswith("ds[record 0]")
    assert [r for _, r in read(tmp_path / "dd")] == ROWS


def test_dataset_dict_with_several_splits_asks_for_one(tmp_path):
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)})
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: .*splits.*dd/train"):
        read(tmp_path / "dd")


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl_bytes(ROWS) + b'{"prompt": "x", "response": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON: Expecting value") as info:
        read(path)
    assert info.value.kind == "malformed_json"


def test_malformed_json_list_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"a": 1},\n{"a": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        read(path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(ROWS) + b'{"prompt": "\xff\xfe"}\n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:3: invalid UTF-8") as info:
        read(path)
    assert info.value.kind == "invalid_utf8"
    (tmp_path / "bad.json").write_bytes(b'[\n{"a": 1},\n{"a": "\xff"}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid UTF-8"):
        read(tmp_path / "bad.json")


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_bytes(jsonl_bytes(ROWS[:1]) + b'["a", "b"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object, got list") as info:
        read(path)
    assert info.value.kind == "wrong_type"


def test_json_that_is_not_a_list(tmp_path):
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of objects, got dict"):
        read(tmp_path / "obj.json")


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read(tmp_path / "nope.jsonl")
    (tmp_path / "a.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"a\.csv: unsupported data format; supported: \.jsonl, .*parquet"):
        read(tmp_path / "a.csv")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        read(tmp_path / "plain_dir")


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:org/name:test: hub dataset 'org/name' needs network access"):
        read("hf:org/name:test")
