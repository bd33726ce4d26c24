"""Secure-aggregation-compatible rounds: the server only sums, so masks that cancel leave the round unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run

from recbole_feddmmr.federated.secure import mask_uploads
from recbole_feddmmr.federated.trainer import FederatedTrainer

SECURE = {"federated": True, "rounds": 2, "clients_per_round": 5, "eval_every": 1, "secure_aggregation": True}


@pytest.mark.parametrize("aggregation", ["mean", "rowwise", "sum"])
def test_a_round_from_pairwise_masked_uploads_equals_the_plain_round(tmp_path, aggregation):
    config, _, (train_data, _, _), model = tiny_run(tmp_path, **SECURE, aggregation=aggregation)
    server = FederatedTrainer(config, model).build_server(train_data)
    selected, instructions = server.strategy.configure_fit(
        0, len(server.clients), server.global_params, server.settings, len(server.windows), server.row_shapes
    )
    clients = [server.clients[i] for i in selected]
    uploads = list(server.backend.run(server.model, clients, instructions, server.windows, server.store))
    assert all(upload.sum_ready and not upload.changed_rows and not len(upload.prototypes) for upload in uploads)
    plain = server.strategy.aggregate_fit(server.global_params, uploads, server.row_shapes, 0).parameters
    masked_uploads = mask_uploads(uploads, seed=3, round_idx=0)
    some = masked_uploads[0].update[next(iter(masked_uploads[0].update))]
    assert some.abs().mean() > 10  # alone, a masked upload is noise
    masked = server.strategy.aggregate_fit(server.global_params, masked_uploads[::-1], server.row_shapes, 0).parameters
    for name, value in plain.items():
        torch.testing.assert_close(masked[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_the_secure_round_equals_the_sparse_round(tmp_path):
    # the same clients, sparse rows and a weighted sum at the server, or dense pre-weighted uploads only summed
    results = {}
    for secure in (False, True):
        config, _, (train_data, _, _), model = tiny_run(
            tmp_path / str(secure), **{**SECURE, "secure_aggregation": secure, "enable_prototype_aggregation": False}
        )
        server = FederatedTrainer(config, model).build_server(train_data)
        server.run_round(0)
        results[secure] = server.global_params
    for name, value in results[False].items():
        torch.testing.assert_close(results[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_robust_rules_are_refused_under_secure_aggregation(tmp_path):
    from conftest import tiny_config

    from recbole_feddmmr.errors import ConfigError
    from recbole_feddmmr.federated.settings import FederatedSettings

    with pytest.raises(ConfigError, match="the server sees only their sum"):
        FederatedSettings.from_config(tiny_config(tmp_path, **SECURE, robust_aggregation="median"))
    assert FederatedSettings.from_config(tiny_config(tmp_path, **SECURE)).local.num_prototypes == 0
