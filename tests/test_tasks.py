"""fastbert.tasks: TaskSpec fields reach the readers (no model needed)."""
import pytest

import fastbert
from fastbert import tasks


@pytest.fixture(scope="module")
def tok():
    return fastbert.Tokenizer.from_pretrained("default")


def test_task_spec_header(tmp_path, tok):
    """header=False reads the first row as an example; None keeps each preset's own setting
    (CoLA's files have no header, SST-2's have one) and a header for other data."""
    path = tmp_path / "rows.tsv"
    path.write_text("a fine film\t1\na dull film\t0\nlovely\t1\n")
    custom = dict(name="single", kind="single", text_cols=["0"], label_col="1")
    assert len(tasks.read(tasks.TaskSpec(**custom, header=False), path, tok).features) == 3
    assert len(tasks.read(tasks.TaskSpec(**custom), path, tok).features) == 2
    cola = tmp_path / "cola.tsv"
    cola.write_text("src\t1\t\tIt rains.\nsrc\t0\t*\tRains it the.\n")
    assert tasks.TaskSpec.preset("cola").header is None
    assert len(tasks.read(tasks.TaskSpec.preset("cola"), cola, tok).features) == 2
    sst2 = tmp_path / "sst2.tsv"
    sst2.write_text("sentence\tlabel\na fine film\t1\n")
    assert len(tasks.read(tasks.TaskSpec.preset("sst2"), sst2, tok).features) == 1
    assert tasks.TaskSpec(**{k: v for k, v in custom.items()}).header is None   # an old saved spec: no field
