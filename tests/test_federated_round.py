"""A federated round on the tiny dataset: equivalence with centralised training, and what leaves a client."""

from __future__ import annotations

import dataclasses

import torch
from conftest import tiny_run

from recbole_feddmmr.federated.client import FedMemClient, LocalSettings, shared_parameters
from recbole_feddmmr.federated.server import FedMemServer
from recbole_feddmmr.federated.strategy import ClientResult, FedMemStrategy
from recbole_feddmmr.trainer import SequenceWindows, UR4RecV2MoETrainer


def test_one_client_with_all_users_and_one_local_epoch_equals_one_centralised_epoch(tmp_path):
    config, _, (train_data, _, _), central = tiny_run(tmp_path)
    trainer = UR4RecV2MoETrainer(config, central)
    torch.manual_seed(7)
    trainer._train_epoch(train_data, 0)

    _, _, _, federated = tiny_run(tmp_path)  # same seed: same initial weights
    windows = SequenceWindows(train_data, federated, config["train_batch_size"], torch.device("cpu"), config["seed"])
    everyone = FedMemClient(0, windows.user_ids.unique(), windows)
    settings = LocalSettings(local_batch_size=config["train_batch_size"], local_lr=config["learning_rate"])
    server = FedMemServer(federated, [everyone], windows, FedMemStrategy(seed=1), settings)
    torch.manual_seed(7)
    report = server.run_round(0)

    assert report.clients == 1 and report.samples == windows.num_targets
    for name, value in central.state_dict().items():
        if name.startswith("memory.prototype"):
            continue  # global prototypes exist only in the federated model
        torch.testing.assert_close(federated.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_clients_send_parameter_updates_and_prototypes_never_their_memory(tmp_path):
    config, _, (train_data, _, _), model = tiny_run(tmp_path, memory_surprise_threshold=-1.0, num_memory_prototypes=2)
    windows = SequenceWindows(train_data, model, 16, torch.device("cpu"), config["seed"])
    clients = [FedMemClient(i, user[None], windows) for i, user in enumerate(windows.user_ids.unique())]
    sent: list[ClientResult] = []
    server = FedMemServer(model, clients, windows, FedMemStrategy(num_prototypes=2), LocalSettings(num_prototypes=2))
    run = server.backend.run

    def recording_run(*args, **kwargs):
        for result in run(*args, **kwargs):
            sent.append(result)
            yield result

    server.backend.run = recording_run
    report = server.run_round(0)
    assert len(sent) == len(clients) == report.clients
    parameter_names = set(shared_parameters(model))
    entry_dim = model.memory.visual.size(-1) + model.memory.text.size(-1)
    for result in sent:
        assert {field.name for field in dataclasses.fields(result)} == {
            "update",
            "num_samples",
            "prototypes",
            "prototype_counts",
            "mean_loss",
        }
        assert set(result.update) == parameter_names  # parameters only: no buffer, no memory slot
        assert not any(name.startswith("memory.") for name in result.update)
        assert result.prototypes.shape[0] <= 2 and result.prototypes.shape[1] == entry_dim
    # the merged global prototypes are now extra memory slots of every user
    assert int(model.memory.prototype_valid.sum()) == 2
    assert report.bytes_up == sum(result.num_bytes() for result in sent)
