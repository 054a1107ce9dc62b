"""Data files as common tools write them: byte-order marks, CRLF, blank lines; errors about a
whole file name it; a mix of formats (or of text and messages) names a row of each."""

import json

import pytest

from kto_jax.data import formats
from kto_jax.data.readers import RowSet, read_rows
from kto_jax.errors import UserError

ROWS = [{"prompt": "a é", "completion": "c", "label": True},
        {"prompt": "d", "completion": "e f", "label": False},
        {"prompt": "g", "completion": "h", "label": True}]
BOM = b"\xef\xbb\xbf"


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_jsonl_with_bom_crlf_and_blank_lines(tmp_path):
    """Windows editors and PowerShell: a UTF-8 mark, CRLF ends, blank and whitespace lines,
    and a second marked file concatenated onto the first (`type a b > c`)."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in ROWS]
    data = BOM + lines[0] + b"\r\n\r\n   \r\n" + lines[1] + b"\r\n" + BOM + lines[2] + b"\r\n\r\n"
    rows = read_rows(_write(tmp_path / "w.jsonl", data))
    assert rows.records == ROWS
    assert [rows.where(i).rsplit(":", 1)[1] for i in range(3)] == ["1", "4", "5"]


@pytest.mark.parametrize("layout", ["list", "columns"])
def test_json_with_bom_and_crlf(tmp_path, layout):
    value = ROWS if layout == "list" else {k: [r[k] for r in ROWS] for k in ROWS[0]}
    text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\r\n")
    assert read_rows(_write(tmp_path / "w.json", BOM + text.encode() + b"\r\n\r\n")).records == ROWS


@pytest.mark.parametrize("suffix, encoding", [(".jsonl", "utf-16"), (".json", "utf-16"),
                                              (".jsonl", "utf-32")])
def test_utf16_and_utf32_files_are_one_error_naming_the_file(tmp_path, suffix, encoding):
    path = _write(tmp_path / f"notepad{suffix}", json.dumps(ROWS[0]).encode(encoding))  # with its mark
    with pytest.raises(UserError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}: the file is {encoding.upper()}")
    assert "save it as UTF-8" in str(err.value) and "\n" not in str(err.value)


def test_whole_file_mistakes_name_the_file(tmp_path):
    empty = _write(tmp_path / "empty.json", b"  \r\n")
    with pytest.raises(UserError, match=f"^{empty}: the file is empty"):
        read_rows(empty)
    array = _write(tmp_path / "array.jsonl", json.dumps(ROWS, indent=1).encode())
    with pytest.raises(UserError, match=f"^{array}: the file starts with a JSON array.*rename it to .json"):
        read_rows(array)
    lines = _write(tmp_path / "lines.json", "\n".join(json.dumps(r) for r in ROWS).encode())
    with pytest.raises(UserError, match=f"^{lines}: the file holds one JSON object per line.*rename it to .jsonl"):
        read_rows(lines)


def _rowset(records):
    return RowSet("mixed.jsonl", "jsonl", records, list(range(1, len(records) + 1)))


def test_mixed_formats_name_a_row_of_each():
    u = {"prompt": "p", "completion": "c", "label": True}
    p = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    s = {"prompt": "p", "completion": "c", "score": 2.0}
    with pytest.raises(UserError) as err:
        formats.detect_format(_rowset([u, u, p, u]))
    assert str(err.value) == ("mixed.jsonl: rows mix data formats: unpaired (prompt, completion, label) "
                              "at mixed.jsonl:1; paired (prompt, chosen, rejected) at mixed.jsonl:3. Put "
                              "each format in its own file, or set data.format to the one to use.")
    with pytest.raises(UserError, match="scored .* at mixed.jsonl:1; .*unpaired.* at mixed.jsonl:2|"
                                        "unpaired .* at mixed.jsonl:2; scored .* at mixed.jsonl:1"):
        formats.detect_format(_rowset([s, u]))
    # one row holding two formats' columns is ambiguous, not a mix: that row is named
    with pytest.raises(UserError, match=r"\(e.g. mixed.jsonl:2\) fit several formats"):
        formats.detect_format(_rowset([u, {**u, "score": 1.0}]))


def test_text_and_messages_mixed_name_a_row_of_each():
    msgs = [{"role": "user", "content": "hi"}]
    records = [{"prompt": "p", "completion": "c", "label": True},
               {"prompt": msgs, "completion": msgs, "label": False}]
    with pytest.raises(UserError, match="rows mix plain text and conversational message lists in "
                                        "'prompt': text at mixed.jsonl:1, messages at mixed.jsonl:2"):
        formats.detect_format(_rowset(records))
