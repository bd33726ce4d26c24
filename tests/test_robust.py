"""Robust aggregation rules on hand-made uploads: each one resists a planted outlier that FedAvg follows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.messages import ClientResult
from recbole_feddmmr.federated.robust import RobustSettings, flatten_uploads, krum_scores, robust_aggregate
from recbole_feddmmr.federated.server_optimizer import ServerOptimizer
from recbole_feddmmr.federated.strategy import FedMemStrategy

PARAMETERS = {"w": torch.zeros(2), "table": torch.zeros(4, 2)}


def upload(w, rows: dict[int, list[float]], client_id: int, samples: int = 10) -> ClientResult:
    indices = torch.tensor(sorted(rows), dtype=torch.long)
    return ClientResult(
        update={"w": torch.tensor(w), "table": torch.tensor([rows[i] for i in sorted(rows)])},
        num_samples=samples,
        prototypes=torch.zeros(0, 0),
        prototype_counts=torch.zeros(0),
        client_id=client_id,
        changed_rows={"table": indices},
    )


HONEST = [upload([1.0, 1.0], {0: [1.0, 0.0]}, 0), upload([1.2, 0.8], {0: [0.8, 0.2]}, 1),
          upload([0.9, 1.1], {1: [0.5, 0.5]}, 2), upload([1.1, 0.9], {0: [1.2, -0.2]}, 3)]  # fmt: skip
ATTACKER = upload([100.0, -100.0], {3: [50.0, 50.0]}, 4)  # pushes item 3 with a huge update


def test_sparse_rows_are_scattered_into_their_table_as_zero_elsewhere():
    flat = flatten_uploads(HONEST[:1], ["w", "table"], {"w": torch.Size([2]), "table": torch.Size([4, 2])})
    torch.testing.assert_close(flat, torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]))


def test_median_and_trimmed_mean_by_hand():
    median = robust_aggregate([*HONEST, ATTACKER], PARAMETERS, RobustSettings("median"))
    torch.testing.assert_close(median["w"], torch.tensor([1.1, 0.9]))  # middle of 0.9, 1.0, 1.1, 1.2, 100
    torch.testing.assert_close(median["table"][3], torch.zeros(2))  # four zeros and the attacker's 50
    trimmed = robust_aggregate([*HONEST, ATTACKER], PARAMETERS, RobustSettings("trimmed_mean", trim=0.2))
    torch.testing.assert_close(trimmed["w"], torch.tensor([(1.0 + 1.1 + 1.2) / 3, (0.8 + 0.9 + 1.0) / 3]))  # cut -100


@pytest.mark.parametrize(
    "settings",
    [
        RobustSettings("median"),
        RobustSettings("trimmed_mean", trim=0.2),
        RobustSettings("norm_bound", norm_bound=2.0),
        RobustSettings("krum", byzantine=1),
        RobustSettings("multi_krum", byzantine=1),
    ],
    ids=lambda settings: settings.rule,
)
def test_every_rule_resists_a_planted_outlier_that_fedavg_follows(settings):
    strategy = FedMemStrategy(aggregation="mean", server_optimizer=ServerOptimizer("fedavg"))
    fedavg = strategy.aggregate_fit(PARAMETERS, [*HONEST, ATTACKER], {"table": torch.Size([4, 2])}).parameters
    assert fedavg["table"][3].abs().max() > 5  # the mean follows the attacker
    robust = FedMemStrategy(aggregation="mean", robust=settings)
    result = robust.aggregate_fit(PARAMETERS, [*HONEST, ATTACKER], {"table": torch.Size([4, 2])}).parameters
    assert result["table"][3].abs().max() < 1 and (result["w"] - torch.tensor([1.0, 1.0])).abs().max() < 0.5


def test_krum_scores_by_hand_and_the_rule_keeps_the_central_update():
    updates = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # f = 1: each update's 4 - 1 - 2 = 1 nearest neighbour: 0 -> 1, 1 -> 1, 2 -> 1, 10 -> 64
    torch.testing.assert_close(krum_scores(updates, 1), torch.tensor([1.0, 1.0, 1.0, 64.0], dtype=torch.float64))


def test_robust_rules_refuse_what_they_cannot_run(tmp_path):
    from conftest import tiny_config

    from recbole_feddmmr.federated.aggregation import UpdateAccumulator
    from recbole_feddmmr.federated.messages import ShardResult
    from recbole_feddmmr.federated.settings import FederatedSettings

    with pytest.raises(ConfigError, match="the ray backend sums shards"):
        FederatedSettings.from_config(
            tiny_config(tmp_path, federated=True, robust_aggregation="median", federated_backend="ray")
        )
    with pytest.raises(ConfigError, match="robust_aggregation must be one of"):
        RobustSettings("geometric_median")
    with pytest.raises(ConfigError, match="sums shards of clients first"):
        FedMemStrategy(robust=RobustSettings("median")).aggregate_fit(PARAMETERS, [ShardResult(UpdateAccumulator())])


@pytest.mark.parametrize("rule", ["median", "multi_krum"])
def test_a_federated_run_with_a_robust_rule_trains(tmp_path, rule):
    from recbole_feddmmr.registry import get_trainer

    settings = {"federated": True, "rounds": 2, "clients_per_round": 4, "eval_every": 1, "robust_aggregation": rule}
    config, _, (train_data, valid_data, test_data), model = tiny_run(tmp_path, **settings)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], "federated")(config, model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.fit(train_data, valid_data, saved=True)
    assert trainer.server.backend.name == "sequential"  # auto never picks Ray under a robust rule
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters() if name in before)
    assert "ndcg@10" in trainer.evaluate(test_data, load_best_model=True)
