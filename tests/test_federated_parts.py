"""Federated building blocks on hand-made inputs: partitions, FedAvg, prototypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recbole_feddmmr.errors import CheckpointError
from recbole_feddmmr.federated.aggregation import UpdateAccumulator, sparse_row_updates
from recbole_feddmmr.federated.client import memory_prototypes
from recbole_feddmmr.federated.messages import ClientResult
from recbole_feddmmr.federated.partition import dominant_labels, partition_users
from recbole_feddmmr.federated.server_optimizer import ServerOptimizer
from recbole_feddmmr.federated.settings import default_local_settings
from recbole_feddmmr.federated.strategy import FedMemStrategy

USERS = np.arange(1, 201)


@pytest.mark.parametrize(("scheme", "num_clients"), [("user", None), ("random", 7), ("dirichlet", 7)])
def test_every_user_is_in_exactly_one_client(scheme, num_clients):
    labels = USERS % 5
    clients = partition_users(USERS, scheme, num_clients, seed=3, user_labels=labels, dirichlet_alpha=0.3)
    assert len(clients) == (len(USERS) if scheme == "user" else num_clients)
    assert all(len(client) > 0 for client in clients)
    assert np.array_equal(np.sort(np.concatenate(clients)), USERS)


def test_dirichlet_partitions_get_more_skewed_as_alpha_shrinks():
    labels = USERS % 5

    def mean_top_label_share(alpha: float) -> float:
        shares = []
        for seed in range(5):
            for client in partition_users(USERS, "dirichlet", 8, seed, user_labels=labels, dirichlet_alpha=alpha):
                shares.append(np.bincount(labels[client - 1], minlength=5).max() / len(client))
        return float(np.mean(shares))

    assert mean_top_label_share(0.05) > mean_top_label_share(1.0) > mean_top_label_share(100.0)
    assert mean_top_label_share(100.0) < 0.5  # near-IID: five labels, no label dominates


def test_dominant_label_counts_every_genre_of_every_item():
    item_labels = np.array([[0, 0], [1, 2], [2, 0], [3, 0]])  # item 0 = padding; item 1 has genres 1 and 2
    users = np.array([5, 5, 5, 9, 9])
    items = np.array([1, 2, 3, 3, 1])
    assert dominant_labels(users, items, item_labels).tolist() == [2, 1]  # user 5: {1:1, 2:2, 3:1}; 9: tie -> 1


def test_fedavg_streaming_sum_equals_the_weighted_mean_by_hand():
    updates = [({"w": torch.tensor([1.0, 2.0])}, 10), ({"w": torch.tensor([4.0, -1.0])}, 30), ({"w": torch.ones(2)}, 0)]
    accumulator = UpdateAccumulator()
    for update, count in updates:
        accumulator.add(update, count)
    expected = (10 * torch.tensor([1.0, 2.0]) + 30 * torch.tensor([4.0, -1.0])) / 40
    torch.testing.assert_close(accumulator.mean()["w"], expected)
    # two pre-aggregated shards give the same mean
    first, second = UpdateAccumulator(), UpdateAccumulator()
    first.add(*updates[0])
    second.add(*updates[1])
    first.add_partial(second)
    torch.testing.assert_close(first.mean()["w"], expected)
    new = ServerOptimizer("fedavg", lr=1.0).step({"w": torch.zeros(2), "frozen": torch.ones(1)}, accumulator.mean())
    torch.testing.assert_close(new["w"], expected)
    assert new["frozen"].item() == 1.0


def test_client_selection_is_seeded_and_sized():
    strategy = FedMemStrategy(client_fraction=0.1, seed=4)
    first = strategy.select_clients(round_idx=2, num_clients=943)
    assert len(first) == 94 and len(set(first.tolist())) == 94
    assert np.array_equal(first, strategy.select_clients(2, 943))
    assert not np.array_equal(first, strategy.select_clients(3, 943))
    assert np.array_equal(FedMemStrategy().select_clients(0, 5), np.arange(5))


def test_prototypes_merge_by_weighted_kmeans_on_hand_made_clusters():
    # two clients, points around (0, 0) and (10, 10); K = 2 global prototypes
    strategy = FedMemStrategy(num_prototypes=2, seed=0)
    client_a = (torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.2, 0.0]]), torch.tensor([1.0, 3.0, 1.0]))
    client_b = (torch.tensor([[10.0, 11.0], [0.0, 0.4]]), torch.tensor([1.0, 2.0]))
    merged, counts = strategy.merge_prototypes([client_a[0], client_b[0]], [client_a[1], client_b[1]])
    order = merged[:, 0].argsort()
    torch.testing.assert_close(merged[order[0]], torch.tensor([0.2 / 4, 0.8 / 4]))  # weights 1, 1, 2
    torch.testing.assert_close(merged[order[1]], torch.tensor([10.0, 10.25]))  # weights 3, 1
    torch.testing.assert_close(counts[order], torch.tensor([4.0, 4.0]))


def test_a_client_sends_only_prototypes_that_average_enough_memory_entries():
    few = torch.randn(4, 4)
    centres, counts = memory_prototypes(few, num_prototypes=5, min_entries=5)
    assert centres.shape == (0, 4) and counts.numel() == 0  # 4 entries < 5: nothing is sent
    centres, counts = memory_prototypes(torch.randn(7, 4), num_prototypes=5, min_entries=5)
    assert counts.tolist() == [7.0]  # one cluster only: the mean of all seven
    many = torch.cat([torch.zeros(6, 4), torch.full((4, 4), 5.0)])
    centres, counts = memory_prototypes(many, num_prototypes=5, min_entries=4)
    assert sorted(counts.tolist()) == [4.0, 6.0]  # k = min(5, 10 // 4) = 2 clusters, both large enough
    centres, counts = memory_prototypes(many, num_prototypes=5, min_entries=5)
    assert counts.tolist() == [6.0]  # the cluster of 4 is dropped
    torch.testing.assert_close(centres, torch.zeros(1, 4))
    result = ClientResult({"w": torch.zeros(10)}, 7, centres, counts)
    assert result.num_bytes() == 10 * 4 + 1 * 4 * 4 + 1 * 4


def test_row_tables_travel_as_changed_rows_and_their_indices():
    delta = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, -2.0]])
    message, changed = sparse_row_updates({"table": delta, "w": torch.ones(3)}, ["table"])
    assert changed["table"].tolist() == [1, 3]
    torch.testing.assert_close(message["table"], torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    torch.testing.assert_close(message["w"], torch.ones(3))
    result = ClientResult(message, 5, torch.zeros(0, 2), torch.zeros(0), changed_rows=changed)
    assert result.num_bytes() == 2 * 2 * 4 + 2 * 8 + 3 * 4  # two rows, their int64 indices, the dense vector


def _two_clients_of_a_table(aggregation: str) -> dict[str, torch.Tensor]:
    """Client A (10 samples) changed rows 1, 2; client B (30 samples) changed row 2; rows 0 and 3 untouched."""
    accumulator = UpdateAccumulator(aggregation, {"table": torch.Size([4, 2])})
    accumulator.add(
        {"table": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "w": torch.tensor([1.0])},
        10,
        {"table": torch.tensor([1, 2])},
    )
    accumulator.add({"table": torch.tensor([[-1.0, 0.0]]), "w": torch.tensor([5.0])}, 30, {"table": torch.tensor([2])})
    return accumulator.mean()


def test_rowwise_aggregation_averages_a_row_over_the_clients_that_changed_it():
    # by hand: row 1 only A changed, row 2 both (weights 10 and 30), rows 0 and 3 nobody
    mean = _two_clients_of_a_table("mean")
    torch.testing.assert_close(
        mean["table"], torch.tensor([[0.0, 0.0], [10 / 40, 20 / 40], [(30 - 30) / 40, 40 / 40], [0.0, 0.0]])
    )
    rowwise = _two_clients_of_a_table("rowwise")
    torch.testing.assert_close(
        rowwise["table"], torch.tensor([[0.0, 0.0], [1.0, 2.0], [(30 - 30) / 40, 40 / 40], [0.0, 0.0]])
    )
    summed = _two_clients_of_a_table("sum")
    torch.testing.assert_close(summed["table"], torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [0.0, 0.0]]))
    for aggregate in (mean, rowwise, summed):  # dense parameters: the weighted mean in every mode
        torch.testing.assert_close(aggregate["w"], torch.tensor([(10 * 1.0 + 30 * 5.0) / 40]))
    with pytest.raises(ValueError, match="aggregation must be one of"):
        UpdateAccumulator("median")


def test_fedavg_with_server_lr_one_is_the_plain_weighted_mean_step():
    params = {"w": torch.tensor([0.3, -1.7, 2.0]), "frozen": torch.ones(1)}
    update = {"w": torch.tensor([0.1, 0.25, -3.0])}
    stepped = ServerOptimizer("fedavg", lr=1.0).step(params, update)
    assert torch.equal(stepped["w"], params["w"] + update["w"])  # bit for bit the old plain step
    assert torch.equal(stepped["frozen"], params["frozen"])


@pytest.mark.parametrize(
    ("name", "bias_correction"),
    [
        ("fedavg", False),
        ("fedavgm", False),
        ("fedadam", False),
        ("fedyogi", False),
        ("fedadam", True),
        ("fedyogi", True),
    ],
)
def test_server_optimizers_follow_the_papers_updates_for_two_rounds(name, bias_correction):
    lr, momentum, b1, b2, tau = 0.5, 0.9, 0.9, 0.99, 0.1
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    deltas = [torch.tensor([0.2, -0.4], dtype=torch.float64), torch.tensor([-0.1, 0.3], dtype=torch.float64)]
    optimizer = ServerOptimizer(
        name, lr=lr, momentum=momentum, beta1=b1, beta2=b2, tau=tau, bias_correction=bias_correction
    )
    x = {"w": x0}
    for delta in deltas:
        x = optimizer.step(x, {"w": delta})
    # the same two rounds written out by hand, elementwise, in plain floats
    for i in range(2):
        value, m, v = x0[i].item(), 0.0, tau**2
        for t, delta in enumerate((d[i].item() for d in deltas), start=1):
            # Adam's (and Flower's FedAdam's) bias correction of the step at round t
            step = lr * (1 - b2**t) ** 0.5 / (1 - b1**t) if bias_correction else lr
            if name == "fedavg":
                value += lr * delta
            elif name == "fedavgm":
                m = momentum * m + delta
                value += lr * m
            else:
                m = b1 * m + (1 - b1) * delta
                if name == "fedadam":
                    v = b2 * v + (1 - b2) * delta**2
                else:
                    v = v - (1 - b2) * delta**2 * (1.0 if v > delta**2 else -1.0 if v < delta**2 else 0.0)
                value += step * m / (v**0.5 + tau)
        assert x["w"][i].item() == pytest.approx(value, rel=1e-12)


def test_server_optimizer_state_round_trips_and_refuses_another_optimizer():
    first = ServerOptimizer("fedadam", lr=0.1)
    params = first.step({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    second = ServerOptimizer("fedadam", lr=0.1)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second.step(params, {"w": torch.ones(2)}), first.step(params, {"w": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="cannot resume"):
        ServerOptimizer("fedyogi").load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="server_optimizer must be one of"):
        ServerOptimizer("fedsgd")


def test_configure_fit_selects_and_sets_the_memory_clock_of_each_local_epoch():
    strategy = FedMemStrategy(clients_per_round=4, seed=3)
    params = {"w": torch.zeros(2)}
    selected, instructions = strategy.configure_fit(
        3, 10, params, default_local_settings(local_epochs=2), epoch_steps=7
    )
    assert np.array_equal(selected, strategy.select_clients(3, 10))
    assert instructions.parameters is params and instructions.round_idx == 3
    # round 3 of 2 local epochs of 7 steps: epochs 0..5 came before; the second local epoch starts one later
    assert (instructions.clock_at(0), instructions.clock_at(1)) == (42, 49)


def test_aggregate_fit_streams_results_and_merges_prototypes_in_client_order():
    strategy = FedMemStrategy(num_prototypes=1, seed=0)
    params = {"w": torch.zeros(2)}
    first = ClientResult(
        {"w": torch.tensor([1.0, 0.0])}, 1, torch.tensor([[0.0, 0.0]]), torch.tensor([5.0]), mean_loss=1.0, client_id=3
    )
    second = ClientResult(
        {"w": torch.tensor([0.0, 3.0])}, 3, torch.tensor([[4.0, 0.0]]), torch.tensor([15.0]), mean_loss=3.0, client_id=1
    )
    outcome = strategy.aggregate_fit(params, iter([first, second]))
    torch.testing.assert_close(outcome.parameters["w"], torch.tensor([0.25, 2.25]))  # (1 [1, 0] + 3 [0, 3]) / 4
    assert (outcome.clients, outcome.samples, outcome.mean_loss) == (2, 4, 2.0)
    assert outcome.bytes_up == first.num_bytes() + second.num_bytes()
    # two prototypes for one global slot: the weighted mean (5 [0, 0] + 15 [4, 0]) / 20
    torch.testing.assert_close(outcome.prototypes, torch.tensor([[3.0, 0.0]]))
    arrived_reversed = strategy.aggregate_fit(params, iter([second, first]))
    torch.testing.assert_close(arrived_reversed.prototypes, outcome.prototypes)


def test_ray_shards_are_contiguous_and_balanced_by_local_steps():
    from recbole_feddmmr.federated.ray_backend import balanced_shards

    class Client:
        def __init__(self, steps: int) -> None:
            self.steps = steps

        def steps_per_epoch(self, windows, settings) -> int:
            return self.steps

    clients = [Client(steps) for steps in [10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 5]]  # 29 steps
    shards = balanced_shards(clients, None, None, 4)  # cuts where 29/4, 29/2, 3*29/4, 29 are reached
    assert [[client.steps for client in shard] for shard in shards] == [[10], [1] * 5, [1] * 4 + [5], [5]]
    assert [client for shard in shards for client in shard] == clients  # every client once, in order
    assert len(balanced_shards(clients[:2], None, None, 8)) == 2 and balanced_shards([], None, None, 3) == []


def test_ray_rounds_are_cut_into_a_multiple_of_the_actors():
    from recbole_feddmmr.federated.ray_backend import RayBackend

    backend = RayBackend(num_actors=2, shards_per_actor=4, shard_clients=32)
    # 943 clients: 943 // 64 = 14 per actor, capped at 4; 236: 3 per actor (not 7 shards for 2 actors); 16: one each
    assert [backend.shard_count(clients) for clients in (943, 236, 127, 16)] == [8, 6, 2, 2]
    assert RayBackend(num_actors=3, shard_clients=1).shard_count(12) == 12
