"""Malicious clients: who they are, what they upload, and the exposure of their targets."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DATA

from recbole_feddmmr.federated.attacks import AttackSettings, exposure_at_k, plan_attack, poison


def test_the_plan_draws_the_malicious_clients_and_unpopular_targets_from_the_seed():
    counts = torch.tensor([0, 50, 40, 30, 20, 10, 5, 3, 2, 1, 0])  # item 0 padding, item 10 never seen
    plan = plan_attack("promote", 0.2, 5.0, num_targets=2, num_clients=20, item_counts=counts, seed=3)
    assert len(plan.malicious) == 4 and plan == plan_attack("promote", 0.2, 5.0, 2, 20, counts, 3)
    assert set(plan.targets) <= {5, 6, 7, 8, 9} and len(plan.targets) == 2  # the least popular half of the seen
    assert plan.popular[:3] == (1, 2, 3)


def test_the_targets_do_not_depend_on_the_attackers_share_and_are_named_without_attackers():
    counts = torch.arange(40, -1, -1)  # item 0 padding (40, cleared by the plan), item 40 never seen
    plans = [plan_attack("promote", f, 5.0, num_targets=3, num_clients=100, item_counts=counts, seed=3)
             for f in (0.0, 0.01, 0.05, 0.1)]  # fmt: skip
    assert [len(plan.malicious) for plan in plans] == [0, 1, 5, 10]
    assert len({plan.targets for plan in plans}) == 1 and len(plans[0].targets) == 3
    assert not plans[0].on  # the reference run: targets named, nobody malicious
    assert plans[1].malicious < plans[2].malicious < plans[3].malicious  # nested: 1% of them are in the 5%
    untargeted = plan_attack("scale", 0.05, 5.0, num_targets=3, num_clients=100, item_counts=counts, seed=3)
    assert untargeted.targets == () and len(untargeted.malicious) == 5


def test_a_promoting_upload_moves_the_targets_towards_the_popular_rows_and_leaves_the_rest_honest():
    table = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, -1.0]])
    attack = AttackSettings("promote", 0.1, 3.0, frozenset({0}), targets=(4,), popular=(1, 2))
    honest = {"item": torch.full((5, 2), 0.01), "w": torch.tensor([0.5])}
    poisoned = poison(honest, {"item": table, "w": torch.zeros(1)}, ("item",), attack)
    torch.testing.assert_close(poisoned["item"][4], 3.0 * (torch.tensor([1.0, 1.0]) - table[4]))
    torch.testing.assert_close(poisoned["item"][:4], honest["item"][:4])
    assert torch.equal(poisoned["w"], honest["w"])
    flipped = poison(honest, {}, (), AttackSettings("sign_flip", 0.1, 2.0, frozenset({0})))
    torch.testing.assert_close(flipped["w"], torch.tensor([-1.0]))


def test_exposure_counts_the_clean_users_whose_top_k_holds_a_target():
    top = torch.tensor([[1, 2], [3, 9], [9, 4], [5, 6]])
    clean = torch.tensor([True, True, False, True])  # user 2 is an attacker's
    assert exposure_at_k(top, torch.tensor([9]), clean) == pytest.approx(1 / 3)


def test_a_federated_run_under_attack_reports_the_targets_exposure(tmp_path):
    from recbole_feddmmr.experiments.runner import run_model

    settings = {"federated": True, "rounds": 2, "clients_per_round": 6, "eval_every": 1, "attack": "promote",
                "attack_fraction": 0.25, "attack_num_targets": 2, "checkpoint_dir": str(tmp_path / "saved"),
                "data_path": str(TEST_DATA), "show_progress": False}  # fmt: skip
    result = run_model("UR4RecV2MoE", "tiny", settings)
    assert result["attack"]["kind"] == "promote" and len(result["attack"]["targets"]) == 2
    assert 0.0 <= result["target_exposure@10"] <= 1.0
    clean = run_model("UR4RecV2MoE", "tiny", settings | {"attack_fraction": 0.0})  # the reference: no attacker
    assert clean["attack"]["targets"] == result["attack"]["targets"] and "target_exposure@10" in clean
