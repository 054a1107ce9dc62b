"""Fixtures of the command tests: `kto-jax data inspect` reads the data tests' tokenizer and
feedback files (tests/data/conftest.py), shared here rather than written twice."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "kto_jax_data_test_fixtures", os.path.join(os.path.dirname(__file__), "..", "data", "conftest.py"))
_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_data)

ROOT, unpaired_rows, write_jsonl = _data.ROOT, _data.unpaired_rows, _data.write_jsonl
tokenizer_dir = _data.tokenizer_dir
