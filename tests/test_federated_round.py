"""A federated round on the tiny dataset: equivalence with centralised training, and what leaves a client."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import tiny_run

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.federated.backends import SequentialBackend, VectorizedBackend
from recbole_feddmmr.federated.client import FedMemClient, client_generator, shared_parameters
from recbole_feddmmr.federated.messages import ClientResult
from recbole_feddmmr.federated.server import FedMemServer
from recbole_feddmmr.federated.settings import default_local_settings
from recbole_feddmmr.federated.strategy import FedMemStrategy
from recbole_feddmmr.trainer import UR4RecV2MoETrainer


def test_one_client_with_all_users_and_one_local_epoch_equals_one_centralised_epoch(tmp_path):
    # no weight decay: centralised Adam decays every item row, a client only the rows it uploads (client.py)
    config, _, (train_data, _, _), central = tiny_run(tmp_path, weight_decay=0.0)
    trainer = UR4RecV2MoETrainer(config, central)
    # the centralised epoch with the client's random stream for its negatives (dropout: global RNG in both)
    generator = client_generator(config["seed"], 0, 0, torch.device("cpu"))
    torch.manual_seed(7)
    trainer._train_epoch(train_data, 0, loss_func=partial(central.calculate_window_loss, generator=generator))

    _, _, _, federated = tiny_run(tmp_path, weight_decay=0.0)  # same seed: same initial weights
    windows = SequenceWindows(train_data, federated, config["train_batch_size"], torch.device("cpu"), config["seed"])
    everyone = FedMemClient(0, windows.user_ids.unique(), windows)
    settings = default_local_settings(  # the centralised trainer's optimizer, batch size and learning rate
        local_optimizer="adam",
        local_batch_size=config["train_batch_size"],
        local_lr=config["learning_rate"],
        weight_decay=config["weight_decay"],
        seed=config["seed"],
    )
    server = FedMemServer(federated, [everyone], windows, FedMemStrategy(seed=1), settings)
    torch.manual_seed(7)
    report = server.run_round(0)
    server.assemble_private_state()

    assert report.clients == 1 and report.samples == windows.num_targets
    for name, value in central.state_dict().items():
        if name.startswith("memory.prototype"):
            continue  # global prototypes exist only in the federated model
        torch.testing.assert_close(federated.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _recorded_round(tmp_path, min_entries: int = 5, round_idx: int = 0, weight_decay: float = 0.0, **overrides):
    """One round of one-user clients on the tiny dataset, every positive written to memory -> (model, report,
    what each client sent)."""
    config, _, (train_data, _, _), model = tiny_run(
        tmp_path, memory_surprise_threshold=-1.0, num_memory_prototypes=2, **overrides
    )
    windows = SequenceWindows(train_data, model, 16, torch.device("cpu"), config["seed"])
    clients = [FedMemClient(i, user[None], windows) for i, user in enumerate(windows.user_ids.unique())]
    sent: list[ClientResult] = []
    settings = default_local_settings(num_prototypes=2, prototype_min_entries=min_entries, weight_decay=weight_decay)
    server = FedMemServer(model, clients, windows, FedMemStrategy(num_prototypes=2), settings)
    run = server.backend.run

    def recording_run(*args, **kwargs):
        for result in run(*args, **kwargs):
            sent.append(result)
            yield result

    server.backend.run = recording_run
    report = server.run_round(round_idx)
    server.assemble_private_state()
    return model, report, sent


def test_weight_decay_keeps_the_item_rows_sparse_and_decays_the_dense_parameters(tmp_path):
    # a sampled loss (two negatives): a client scores a few items, not the whole catalogue as CE does
    sampled = {"loss_type": "BPR", "train_neg_num": 2}
    _, _, plain = _recorded_round(tmp_path / "plain", **sampled)
    model, _, decayed = _recorded_round(tmp_path / "decayed", weight_decay=0.1, **sampled)
    for without, with_decay in zip(plain, decayed, strict=True):
        # the same item rows travel: a row the client never scored is not decayed into a changed row
        assert len(with_decay.changed_rows["item_embedding.weight"]) < model.n_items - 1
        assert torch.equal(
            without.changed_rows["item_embedding.weight"], with_decay.changed_rows["item_embedding.weight"]
        )
    dense = [name for name in plain[0].update if name != "item_embedding.weight"]
    assert any(not torch.equal(plain[0].update[name], decayed[0].update[name]) for name in dense)


def test_clients_send_parameter_updates_and_prototypes_never_their_memory(tmp_path):
    model, report, sent = _recorded_round(tmp_path)
    assert len(sent) == report.clients == model.memory.item_ids.size(0) - 1  # every user but the padding one
    parameter_names = set(shared_parameters(model))
    entry_dim = model.memory.prototype_visual.size(-1) + model.memory.prototype_text.size(-1)
    for result in sent:
        assert {field.name for field in dataclasses.fields(result)} == {
            "update",
            "num_samples",
            "prototypes",
            "prototype_counts",
            "mean_loss",
            "client_id",
            "changed_rows",
            "weight",
            "sum_ready",
            "row_weights",
        }
        assert result.weight is None and not result.sum_ready and not result.row_weights  # no DP, no SecAgg
        assert set(result.update) == parameter_names  # parameters only: no buffer, no memory slot
        # the item embedding travels as its changed rows: those of the items this client scored
        rows = result.changed_rows["item_embedding.weight"]
        assert 0 < len(rows) < model.n_items and 0 not in rows.tolist()  # never the padding row
        assert result.update["item_embedding.weight"].shape == (len(rows), model.item_emb_dim)
        assert not any(name.startswith("memory.") for name in result.update)
        assert "user_embedding.weight" not in result.update  # per-user parameters stay with their client
        assert result.prototypes.shape[0] <= 2 and result.prototypes.shape[1] == entry_dim
    # the merged global prototypes are now extra memory slots of every user
    assert int(model.memory.prototype_valid.sum()) == 2
    assert report.bytes_up == sum(result.num_bytes() for result in sent)


def _one_user_clients(tmp_path, backend, device="cpu", *, float64=True, dropout=0.0, test_data=None, **settings):
    """A model and a server of one-user clients on the tiny dataset, in float64 and without dropout unless
    asked; the test split is appended to ``test_data`` (a list) when one is given."""
    config, _, (train_data, _, test_split), model = tiny_run(
        tmp_path,
        device,
        dropout=dropout,
        memory_surprise_threshold=0.3,
        num_memory_prototypes=2,
        MAX_ITEM_LIST_LENGTH=4,  # short windows: users have several, so some clients take several local steps
    )
    if test_data is not None:
        test_data.append(test_split)
    if float64:
        model.double()
    windows = SequenceWindows(train_data, model, 16, torch.device(device), config["seed"])
    clients = [FedMemClient(i, user[None], windows) for i, user in enumerate(windows.user_ids.unique())]
    local = default_local_settings(num_prototypes=2, seed=config["seed"], **settings)
    return model, FedMemServer(model, clients, windows, FedMemStrategy(num_prototypes=2), local, backend=backend)


# FedProx with few local steps: on a parameter whose loss gradient is exactly zero (attention key biases),
# Adam steps by lr * g / eps for tiny g, so the proximal gradient mu * (w - w_global) grows round-off by
# lr * mu / eps = 5e4 per step in either backend; after ~4 steps that noise is lr-sized and the two differ.
BACKEND_SETTINGS = [{"local_epochs": 2, "local_batch_size": 2}, {"fedprox_mu": 0.5, "local_batch_size": 8}]


@pytest.mark.parametrize("settings", BACKEND_SETTINGS)
def test_sequential_and_vectorized_backends_compute_the_same_rounds(tmp_path, settings):
    assert_backends_compute_the_same_rounds(tmp_path, settings, "cpu")


def assert_backends_compute_the_same_rounds(tmp_path, settings, device):
    """Same seed and settings: the same aggregated model, memories, prototypes and losses after two rounds.

    Float64 and dropout 0, so that local Adam and FedProx can be checked: in float32 Adam turns the
    round-off noise on parameters whose true gradient is exactly zero (the key biases of softmax
    attention) into lr-sized steps of either sign. Float32 with dropout: the test below.
    """
    sequential_model, sequential = _one_user_clients(tmp_path / "s", SequentialBackend(), device, **settings)
    _, vectorized = _one_user_clients(tmp_path / "v", VectorizedBackend(chunk_targets=20), device, **settings)
    chunks = vectorized.backend.chunks(vectorized.clients, vectorized.windows, vectorized.settings)
    assert len(chunks) > 1 and max(len(chunk) for chunk in chunks) > 1  # batched, and in several chunks
    steps = {client.steps_per_epoch(vectorized.windows, vectorized.settings) for client in vectorized.clients}
    assert len(steps) > 1 or settings.get("fedprox_mu")  # clients with several local steps are part of the test
    for round_idx in range(2):
        by_loop, by_vmap = sequential.run_round(round_idx), vectorized.run_round(round_idx)
        assert by_vmap.mean_loss == pytest.approx(by_loop.mean_loss, rel=1e-6)
        assert (by_vmap.samples, by_vmap.bytes_up, by_vmap.bytes_down) == (
            by_loop.samples,
            by_loop.bytes_up,
            by_loop.bytes_down,
        )
    assert int(sequential_model.memory.prototype_valid.sum()) == 2
    assert_same_private_states_and_models(sequential, vectorized)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_backends_agree_in_float32_with_the_default_dropout(tmp_path, device):
    """Each client's dropout masks come from its own generator (keyed dropout), so the two backends train the
    same round in float32 with dropout on, up to the order of float sums."""
    settings = {"local_optimizer": "sgd", "local_lr": 0.1, "local_batch_size": 2}  # the federated defaults' SGD
    test_data = []
    servers = [
        _one_user_clients(
            tmp_path / name, backend, device, float64=False, dropout=0.1, test_data=test_data, **settings
        )[1]
        for name, backend in (("s", SequentialBackend()), ("v", VectorizedBackend(chunk_targets=20)))
    ]
    losses = []
    for round_idx in range(2):
        reports = [server.run_round(round_idx) for server in servers]
        assert reports[1].mean_loss == pytest.approx(reports[0].mean_loss, rel=1e-5)
        losses.append(reports[0].mean_loss)
    scores = []
    for server in servers:
        server.assemble_private_state()
        server.model.eval()
        with torch.no_grad():
            scores.append(torch.cat([server.model.full_sort_predict(batch[0].to(device)) for batch in test_data[0]]))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-3, atol=1e-5)  # full-ranking scores [users, items]
    reference = servers[0].model.state_dict()
    for name, value in servers[1].model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    # dropout was on: without it the same round trains to another loss
    _, no_dropout = _one_user_clients(tmp_path / "n", SequentialBackend(), device, float64=False, **settings)
    assert no_dropout.run_round(0).mean_loss != pytest.approx(losses[0], rel=1e-3)


def assert_same_private_states_and_models(expected: FedMemServer, other: FedMemServer) -> None:
    """Every client's private state, as its store holds it, and the assembled models agree to 1e-4."""
    assert other.store.states.keys() == expected.store.states.keys() == {c.client_id for c in other.clients}
    for client_id, state in other.store.states.items():
        for name, value in state.items():
            torch.testing.assert_close(value, expected.store.states[client_id][name], rtol=1e-4, atol=1e-7)
    expected.assemble_private_state()
    other.assemble_private_state()
    reference = expected.model.state_dict()
    for name, value in other.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-7, msg=name)


def test_no_sent_prototype_is_a_single_items_feature_row(tmp_path):
    """A prototype of one memory entry is an item's feature row: the server would learn an item the user saw."""
    model, _, sent = _recorded_round(tmp_path)
    features = model.item_features
    item_rows = torch.cat([features.visual, features.text], dim=1)[1:]  # [items, Fv + Ft], without padding
    prototypes = torch.cat([result.prototypes for result in sent])  # [P, Fv + Ft]
    assert len(prototypes) > 0  # clients with five or more memory entries did send
    assert all((result.prototype_counts >= 5).all() for result in sent)
    distance = torch.cdist(prototypes.double(), item_rows.double())  # [P, items]
    assert distance.min() > 1e-4
    # the rule is what protects them: with one entry allowed, some prototypes are items' rows
    model, _, leaky = _recorded_round(tmp_path / "leaky", min_entries=1)
    leaked = torch.cdist(torch.cat([result.prototypes for result in leaky]).double(), item_rows.double())
    assert (leaked.min(dim=1).values < 1e-4).any()


def test_a_sampled_round_touches_only_its_selected_clients_private_state(tmp_path):
    config, _, (train_data, _, _), model = tiny_run(tmp_path, memory_surprise_threshold=-1.0)
    windows = SequenceWindows(train_data, model, 16, torch.device("cpu"), config["seed"])
    clients = [FedMemClient(i, user[None], windows) for i, user in enumerate(windows.user_ids.unique())]
    strategy = FedMemStrategy(num_prototypes=2, clients_per_round=3, seed=5)
    server = FedMemServer(model, clients, windows, strategy, default_local_settings(num_prototypes=2))
    server.assemble_private_state()  # the initial private rows, every user's
    before = {name: value.clone() for name, value in model.state_dict().items()}
    selected = strategy.select_clients(0, len(clients))
    report = server.run_round(0)
    assert report.clients == 3
    # the round loaded, trained and stored the private state of its three clients and of no other
    assert set(server.store.states) == set(selected.tolist())
    assert model.memory.item_ids.size(0) == 0  # between rounds the server's model holds no user's rows
    server.assemble_private_state()
    chosen_users = torch.cat([clients[i].user_ids for i in selected])
    others = torch.tensor([user for user in range(model.memory.item_ids.size(0)) if user not in chosen_users])
    after = model.state_dict()
    for name in ("memory.item_ids", "memory.count", "memory.time", "user_embedding.weight"):
        assert torch.equal(after[name][others], before[name][others]), name  # no other user's row moved
        assert not torch.equal(after[name][chosen_users], before[name][chosen_users]), name  # the selected trained


@pytest.mark.ray
def test_the_ray_backend_computes_the_sequential_backends_rounds(tmp_path):
    """Two local actors, each a shard of the clients: same aggregate, prototypes and private states, also
    when an actor is killed before the second round (it is replaced and its shard rerun)."""
    import ray

    from recbole_feddmmr.federated.ray_backend import RayBackend

    root = str(Path(__file__).resolve().parents[1])  # the workers import this checkout, as the driver does
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        settings = {"local_epochs": 2, "local_batch_size": 2}
        _, sequential = _one_user_clients(tmp_path / "s", SequentialBackend(), **settings)
        backend = RayBackend(num_actors=2, shard_clients=1)  # 8 shards of the 12 clients, handed out as actors finish
        _, over_ray = _one_user_clients(tmp_path / "r", backend, **settings)
        for round_idx in range(2):
            if round_idx == 1:  # an actor dies between rounds: the next round replaces it and reruns its shard
                ray.kill(over_ray.backend.actors[0])
                killed = over_ray.backend.actors[0]
            by_loop, by_actors = sequential.run_round(round_idx), over_ray.run_round(round_idx)
            assert by_actors.mean_loss == pytest.approx(by_loop.mean_loss, rel=1e-6)
            assert (by_actors.clients, by_actors.samples, by_actors.bytes_up, by_actors.bytes_down) == (
                by_loop.clients,
                by_loop.samples,
                by_loop.bytes_up,
                by_loop.bytes_down,
            )
        assert over_ray.backend.actors[0] is not killed  # replaced, and nothing was lost or counted twice
        assert_same_private_states_and_models(sequential, over_ray)  # the state travelled with each client
    finally:
        ray.shutdown()
