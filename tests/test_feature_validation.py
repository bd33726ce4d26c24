"""Bad .itememb files fail before training, with one line naming the file, line or item and the fix."""

from __future__ import annotations

import shutil

import pytest
from conftest import TEST_DATA, tiny_config

from recbole_feddmmr.datasets import check_item_features
from recbole_feddmmr.features.validate import FeatureFileError, validate_itememb

ITEMS = {"1", "2", "3"}
HEADER = "iid:token\tsbert_emb:float_seq\tclip_emb:float_seq"


def write(tmp_path, *rows, header=HEADER):
    path = tmp_path / "x.itememb"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def check(path, dims=None):
    return validate_itememb(path, ITEMS, dims or {"sbert_emb": 2, "clip_emb": 3})


def test_a_valid_file_reports_items_dimensions_and_missing_images(tmp_path):
    report = check(write(tmp_path, "1\t0.1 0.2\t1 2 3", "3\t0.5 -1e-3\t", "2\t0 1\t4 5 6"))
    assert report.items == 3 and report.dims == {"sbert_emb": 2, "clip_emb": 3}
    assert report.missing == {"clip_emb": 1}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["1\t0.1 0.2 0.3\t1 2 3"], r"x.itememb:2: column 'sbert_emb' of item '1' has 3 values, expected 2"),
        (["1\t0.1 0.2\t1 2 3", "2\t0.1 0.2\t1 2"], r":3: column 'clip_emb' of item '2' has 2 values, expected 3"),
        (["1\t0.1 nan\t1 2 3"], r":2: column 'sbert_emb' of item '1' contains NaN or inf"),
        (["1\t0.1 0.2\tinf 2 3"], r":2: column 'clip_emb' of item '1' contains NaN or inf"),
        (["1\t0.1 0.2\t1 2 3", "9\t0.1 0.2\t1 2 3"], r"1 item ids are not in the .inter file \(e.g. \['9'\]\).*remove"),
        (["1\t0.1 0.2\t1 2 3", "1\t0.3 0.4\t1 2 3"], r":3: item '1' appears again \(first at line 2\)"),
        (["2\t0.1 0,2\t1 2 3"], r":2: column 'sbert_emb' of item '2' has '0,2', not a number"),
        (["2\t0.1 0.2"], r":2: 2 tab-separated cells, the header has 3"),
    ],
)
def test_each_defect_is_named_with_its_line_and_fix(tmp_path, rows, message):
    with pytest.raises(FeatureFileError, match=message):
        check(write(tmp_path, *rows))


def test_header_must_have_the_id_and_float_seq_columns(tmp_path):
    with pytest.raises(FeatureFileError, match=r":1: no 'iid:token' column"):
        check(write(tmp_path, "1\t0.1", header="item:token\tsbert_emb:float_seq"))
    with pytest.raises(FeatureFileError, match=r":1: column 'sbert_emb' has type 'float'"):
        check(write(tmp_path, "1\t0.1", header="iid:token\tsbert_emb:float"))


def test_dimension_is_checked_against_the_model_config(tmp_path):
    data = tmp_path / "data" / "tiny"
    shutil.copytree(TEST_DATA / "tiny", data)
    config = tiny_config(tmp_path, data_path=str(tmp_path / "data"), text_dim=7)
    with pytest.raises(
        FeatureFileError, match=r"tiny.itememb:2: column 'sbert_emb' of item '30' has 8 values, expected 7"
    ):
        check_item_features(config)
    report = check_item_features(tiny_config(tmp_path, data_path=str(tmp_path / "data")))
    assert report.items == 30 and report.missing == {"clip_emb": 5}


def test_a_feature_file_the_config_would_not_load_is_an_error_not_a_silent_run(tmp_path):
    config = tiny_config(tmp_path, additional_feat_suffix=None)
    with pytest.raises(FeatureFileError, match=r"tiny.itememb exists but the config does not load it"):
        check_item_features(config)
    sasrec = tiny_config(tmp_path, model="SASRec", additional_feat_suffix=None)
    assert check_item_features(sasrec) is None  # a model that reads no item features is not concerned
