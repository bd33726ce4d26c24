"""Files written whole: several writers of one file, and a writer that fails."""

from __future__ import annotations

import numpy as np
import pytest

from recbole_feddmmr.atomic_write import replaced_when_whole
from recbole_feddmmr.features.atomic import read_atomic, write_itememb


def test_two_writers_of_one_file_both_finish_and_the_last_rename_wins(tmp_path):
    # what two benchmark jobs building one dataset at once do: a second writer starts and finishes while the
    # first is writing (with one shared temporary name the first then found no file to rename)
    target = tmp_path / "ml-100k.itememb"
    with replaced_when_whole(target) as first:
        first.write_text("first\n")
        write_itememb(target, ["1", "2"], {"sbert_emb": np.array([[1.0, 2.0], [3.0, 4.0]])})
        assert read_atomic(target)["sbert_emb"].tolist() == ["1 2", "3 4"]
        assert first.read_text() == "first\n"  # the second writer did not touch the first's file
    assert target.read_text() == "first\n"
    assert [path.name for path in tmp_path.iterdir()] == [target.name]  # no temporary file left behind


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), replaced_when_whole(target) as partial:
        partial.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == [target.name]
