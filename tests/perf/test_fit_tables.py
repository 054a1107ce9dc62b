"""docs/tpu.md's (and docs/lora.md's QLoRA) fit tables are what `kto-jax compile` prints (scripts/tpu_fit_tables.py):
the tables are the rendering of the stored results, every row has one, and the tiny row
compiled afresh gives the stored figures."""

import importlib.util
import os
import sys

import pytest

# libtpu (TPU compiles on this host): one xdist worker runs these tests (pytest.ini)
pytestmark = pytest.mark.xdist_group("libtpu")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("tpu_fit_tables",
                                               os.path.join(REPO, "scripts", "tpu_fit_tables.py"))
tables = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tables   # its dataclasses look their module up there
_spec.loader.exec_module(tables)

REPORT = """\
model tiny (2 layers, hidden 64), loss kto, reference a frozen copy of the policy, full parameters, sequences 24+48 tokens, topology v5e-4
microbatch 4 = 1 per chip over 4 batch shards, 2 accumulation steps
AOT compile for v5e-4: 1 x 4 chips, v5e topology 2x2, mesh data=4 fsdp=1 tensor=1
per-device memory:
  arguments              2.02 MiB
  outputs                2.03 MiB
  aliased (donated)     -2.01 MiB
  temporaries           1.500 GiB
  generated code         2.62 MiB
  total                  4.65 MiB
  peak (XLA)             6.88 MiB
verdict: fits (0% of 16.000 GiB HBM per chip)
lower 1.1 s, compile 5.7 s
"""


def test_report_is_read_as_printed():
    report = tables.parse_report(REPORT)
    assert report["sizes_gib"] == {"arguments": 2.02 / 1024, "temporaries": 1.5,
                                   "total": 4.65 / 1024, "peak (XLA)": 6.88 / 1024}
    assert report["slice_mesh"] == ["v5e-4", "data=4 fsdp=1 tensor=1"]
    assert report["microbatch"] == ["4", "1", "2"] and report["fits"]
    with pytest.raises(ValueError, match="no verdict"):
        tables.parse_report(REPORT.replace("verdict:", "outcome:"))


def test_the_doc_is_the_rendering_of_the_results_and_every_row_is_measured():
    results = tables.load_results()
    assert set(results["rows"]) == set(tables.BY_ID)
    for doc in (tables.DOC, tables.LORA_DOC):   # docs/tpu.md's tables and docs/lora.md's QLoRA one
        with open(doc, encoding="utf-8") as f:
            assert f.read() == tables.rewrite_doc(results, doc), \
                f"{doc} differs from its tables: run python scripts/tpu_fit_tables.py --render"


def _without_compile_time(line: str) -> str:
    return line.rsplit("|", 2)[0]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the tpu extra)")
def test_the_tiny_row_compiled_afresh_gives_the_stored_figures():
    row = tables.BY_ID["tiny-v5e4"]
    stored = tables.load_results()["rows"][row.id]
    fresh = tables.compile_row(row, timeout=600)
    for key in ("sizes_gib", "slice_mesh", "microbatch", "verdict", "fits"):
        assert fresh[key] == stored[key], key
    assert _without_compile_time(tables.render_row(row, fresh)) == \
        _without_compile_time(tables.render_row(row, stored))
