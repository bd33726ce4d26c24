"""The recommend command on a tiny trained checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CONFIG, command

from recbole_feddmmr.errors import CheckpointError, ConfigError
from recbole_feddmmr.quick_start import load_checkpoint, run_recbole_feddmmr
from recbole_feddmmr.recommend import EXPERTS, main, user_history


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("recommend")
    settings = dict(TINY_CONFIG, checkpoint_dir=str(folder / "saved"), epochs=2, memory_surprise_threshold=0.0)
    return run_recbole_feddmmr(model="UR4RecV2MoE", dataset="tiny", config_dict=settings)["checkpoint"]


def test_top_k_leaves_out_the_users_items_and_expert_shares_sum_to_one(checkpoint, capsys):
    result = main(["--checkpoint", checkpoint, "--user", "3", "--k", "5", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result, default=float))  # --json prints what it returns
    _, model, dataset, *_ = load_checkpoint(checkpoint)
    seen, _ = user_history(dataset, int(dataset.token2id(dataset.uid_field, "3")))
    seen_tokens = set(dataset.id2token(dataset.iid_field, seen))
    items = result["items"]
    assert len(items) == 5 and not {row["item"] for row in items} & seen_tokens
    assert [row["score"] for row in items] == sorted((row["score"] for row in items), reverse=True)
    for row in items:
        assert sum(row[expert] for expert in EXPERTS) == pytest.approx(1.0, abs=1e-5)
    # the scores are the model's full ranking for the user's whole history, at its last item's time
    with_seen = main(["--checkpoint", checkpoint, "--user", "3", "--k", "30", "--no-exclude-seen", "--json"])
    assert {row["item"] for row in with_seen["items"]} >= seen_tokens - {"[PAD]"}
    best_unseen = next(row for row in with_seen["items"] if row["item"] not in seen_tokens)
    assert best_unseen["item"] == items[0]["item"] and best_unseen["score"] == pytest.approx(items[0]["score"])
    # the memory the experts read: the user's highest-utility slots, with their utility and surprise
    memory = result["memory"]
    assert 0 < len(memory) <= model.memory_top_k_eval
    assert {row["item"] for row in memory} <= seen_tokens  # a memory only ever holds the user's own items
    utilities = [row["utility"] for row in memory]
    assert utilities == sorted(utilities, reverse=True) and all(0 <= row["surprise"] <= 1 for row in memory)


def test_the_tables_name_the_items_by_title(checkpoint, capsys):
    main(["--checkpoint", checkpoint, "--user", "3", "--k", "3"])
    output = capsys.readouterr().out
    assert "top 3 for user 3 (UR4RecV2MoE on tiny; the user's own items left out)" in output
    assert "title" in output and "semantic" in output and "memory the experts read for user 3" in output


def test_an_unknown_user_or_checkpoint_is_a_one_line_error(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="unknown user 'nobody' in dataset tiny"):
        main(["--checkpoint", checkpoint, "--user", "nobody"])
    with pytest.raises(CheckpointError, match="no checkpoint"):
        main(["--checkpoint", str(tmp_path / "missing.pth"), "--user", "3"])
    done = command(tmp_path, "-m", "recbole_feddmmr.recommend", "--checkpoint", checkpoint, "--user", "nobody")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: unknown user 'nobody'")
    assert len(done.stderr.strip().splitlines()) == 1
