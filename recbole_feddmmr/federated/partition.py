"""Which users belong to which client.

``user``: one client per user (FedDMMR's default). ``random``: ``num_clients`` clients of
(nearly) equal size, users assigned at random. ``dirichlet``: ``num_clients`` non-IID clients:
users are grouped by a label (e.g. their dominant item genre) and each label's users are
spread over the clients by proportions drawn from Dirichlet(alpha); small alpha concentrates
each label on few clients (the usual label-skew partition of federated benchmarks).
Every user ends up in exactly one client.
"""

from __future__ import annotations

import numpy as np

from recbole_feddmmr.errors import ConfigError

SCHEMES = ("user", "random", "dirichlet")


def partition_users(
    user_ids: np.ndarray,
    scheme: str = "user",
    num_clients: int | None = None,
    seed: int = 0,
    *,
    user_labels: np.ndarray | None = None,
    dirichlet_alpha: float = 0.5,
) -> list[np.ndarray]:
    """``user_ids`` [U] -> one array of user ids per client (sorted ids inside each client)."""
    user_ids = np.asarray(user_ids)
    if scheme not in SCHEMES:
        raise ConfigError(f"partition must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "user":
        return [np.array([user]) for user in np.sort(user_ids)]
    if not num_clients or not 1 <= num_clients <= len(user_ids):
        raise ConfigError(f"partition={scheme!r} needs 1 <= num_clients <= {len(user_ids)} users, got {num_clients}")
    rng = np.random.default_rng(seed)
    if scheme == "random":
        return [np.sort(part) for part in np.array_split(rng.permutation(user_ids), num_clients)]
    if user_labels is None or len(user_labels) != len(user_ids):
        raise ValueError("partition='dirichlet' needs one label per user (user_labels)")
    if dirichlet_alpha <= 0:
        raise ConfigError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    members: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(user_labels):
        users = rng.permutation(user_ids[user_labels == label])
        shares = rng.dirichlet(np.full(num_clients, dirichlet_alpha))  # [K]
        cuts = (np.cumsum(shares)[:-1] * len(users)).round().astype(int)
        for client, part in enumerate(np.split(users, cuts)):
            members[client].extend(part.tolist())
    # a client left empty by the draw takes one user from the largest client, so none is idle
    for client in range(num_clients):
        if not members[client]:
            largest = max(range(num_clients), key=lambda c: len(members[c]))
            members[client].append(members[largest].pop())
    return [np.sort(np.array(part, dtype=user_ids.dtype)) for part in members]


def dominant_labels(user_ids: np.ndarray, item_ids: np.ndarray, item_labels: np.ndarray) -> np.ndarray:
    """Each user's most frequent item label.

    ``user_ids``, ``item_ids`` [I] interactions; ``item_labels`` [n_items, T] label ids per item (0 = padding,
    e.g. RecBole's token_seq genre field) -> [len(unique users)] label, users in sorted order.
    """
    labels = item_labels[item_ids]  # [I, T]
    users = np.repeat(user_ids, labels.shape[1])
    flat = labels.reshape(-1)
    keep = flat > 0
    users, flat = users[keep], flat[keep]
    unique_users = np.unique(user_ids)
    counts = np.zeros((len(unique_users), int(item_labels.max()) + 1), dtype=np.int64)  # [U, labels]
    np.add.at(counts, (np.searchsorted(unique_users, users), flat), 1)
    return counts.argmax(axis=1)
