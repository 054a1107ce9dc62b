"""Readers: every file kind gives the same records; bad bytes and JSON name file:line."""

import json

import pytest

from kto_jax.data.readers import read_rows
from kto_jax.errors import UserError

ROWS = [{"prompt": "a b", "completion": "c", "label": True},
        {"prompt": "d", "completion": "e f", "label": False},
        {"prompt": "g", "completion": "h", "label": True}]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), json.dumps(ROWS[2])]))
    rows = read_rows(str(path))
    assert rows.records == ROWS
    assert [rows.where(i) for i in range(3)] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert rows.columns == ["prompt", "completion", "label"]


def test_json_list_and_columnar_forms(tmp_path):
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps(ROWS))
    columnar = tmp_path / "b.json"
    columnar.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    assert read_rows(str(listed)).records == ROWS
    assert read_rows(str(columnar)).records == ROWS
    assert read_rows(str(listed)).where(1) == f"{listed} row 2"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(str(path)).records == ROWS


def test_datasets_directory_and_dataset_dict_split(tmp_path):
    import datasets
    plain = tmp_path / "plain"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(plain))
    assert read_rows(str(plain)).records == ROWS
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(both))
    assert read_rows(str(both), split="test").records == ROWS[2:]
    with pytest.raises(UserError, match=r"splits \['test', 'train'\], not 'validation'"):
        read_rows(str(both), split="validation")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data.train_path: no such file or directory"):
        read_rows(str(tmp_path / "nope.jsonl"))


def test_empty_path_and_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="data.train_path is empty"):
        read_rows("")
    odd = tmp_path / "d.txt"
    odd.write_text("x")
    with pytest.raises(UserError, match="cannot tell the file type"):
        read_rows(str(odd))


def test_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match="not a datasets save_to_disk directory"):
        read_rows(str(tmp_path))


def test_hub_id_is_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub is offline"):
        read_rows("someone/some-dataset")


def test_invalid_utf8_and_json_are_reported_as_file_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n"
                     + b'{"prompt": "caf\xe9", "completion": "x", "label": true}\n'
                     + b'{"prompt": "x", "completion": \n'
                     + b'[1, 2]\n')
    with pytest.raises(UserError) as err:
        read_rows(str(path))
    text = str(err.value)
    assert f"{path}:2: invalid UTF-8" in text
    assert f"{path}:3: invalid JSON" in text
    assert f"{path}:4: expected a JSON object" in text
    assert "(3 problems)" in text


def test_invalid_json_file_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(UserError, match=rf"{path}:3: invalid JSON"):
        read_rows(str(path))
    raw = tmp_path / "bytes.json"
    raw.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "\xff"}]')
    with pytest.raises(UserError, match=rf"{raw}:3: invalid UTF-8"):
        read_rows(str(raw))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        read_rows(str(path))
