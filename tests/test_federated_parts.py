"""Federated building blocks on hand-made inputs: partitions, FedAvg, prototypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recbole_feddmmr.federated.partition import dominant_labels, partition_users
from recbole_feddmmr.federated.strategy import ClientResult, FedMemStrategy, UpdateAccumulator, memory_prototypes

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
    new = FedMemStrategy.apply({"w": torch.zeros(2), "frozen": torch.ones(1)}, accumulator.mean())
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


def test_client_prototypes_use_what_it_has_below_k_and_result_counts_its_bytes():
    few = torch.randn(3, 4)
    centres, counts = memory_prototypes(few, num_prototypes=5)
    torch.testing.assert_close(centres, few)
    assert counts.tolist() == [1.0, 1.0, 1.0]
    many = torch.cat([torch.zeros(6, 4), torch.full((4, 4), 5.0)])
    centres, counts = memory_prototypes(many, num_prototypes=2)
    assert sorted(counts.tolist()) == [4.0, 6.0]
    result = ClientResult({"w": torch.zeros(10)}, 7, centres, counts)
    assert result.num_bytes() == 10 * 4 + 2 * 4 * 4 + 2 * 4
