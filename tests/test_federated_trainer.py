"""Federated runs end to end on the tiny dataset: rounds, RecBole evaluation, crash and resume."""

from __future__ import annotations

import pytest
import torch
from conftest import crash_rounds_after, tiny_run

from recbole_feddmmr.federated.backends import AUTO_RAY_MIN_STEPS, auto_backend
from recbole_feddmmr.federated.trainer import FederatedTrainer
from recbole_feddmmr.provenance import usable_cpus
from recbole_feddmmr.registry import get_trainer

# every client every round and a validation after each, whatever properties/federated.yaml makes the default
FEDERATED = {
    "federated": True,
    "rounds": 3,
    "local_batch_size": 8,
    "num_memory_prototypes": 2,
    "memory_surprise_threshold": 0.0,  # every positive written: memories large enough for two prototypes
    "stopping_step": 5,
    "clients_per_round": None,
    "eval_every": 1,
    "resume_every_s": 0,
}


def run(tmp_path, **overrides):
    config, _, (train_data, valid_data, test_data), model = tiny_run(tmp_path, **{**FEDERATED, **overrides})
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], "federated" if config["federated"] else None)(
        config, model
    )
    assert isinstance(trainer, FederatedTrainer)
    trainer.fit(train_data, valid_data, saved=True)
    return trainer, trainer.evaluate(test_data, load_best_model=True)


def test_a_federated_run_trains_by_rounds_and_evaluates_with_recboles_evaluator(tmp_path):
    trainer, test_result = run(tmp_path)
    reports = trainer.round_reports
    assert [report.round_idx for report in reports] == [0, 1, 2]
    assert all(report.clients == 12 for report in reports)  # one client per user, all of them every round
    assert all(report.bytes_up > 0 and report.bytes_down > 0 for report in reports)
    assert trainer.best_valid_score == max(report.valid_score for report in reports)  # validated every round
    assert set(test_result) >= {"hit@10", "ndcg@10"}
    assert not trainer.resume_file.exists()  # a finished run leaves no resume state behind
    assert int(trainer.model.memory.prototype_valid.sum()) == 2  # global prototypes are set


def test_random_and_dirichlet_partitions_group_users_into_clients(tmp_path):
    trainer, _ = run(tmp_path, partition="random", num_clients=3, rounds=1, client_fraction=0.5)
    assert trainer.round_reports[0].clients == 2  # half of 3 clients, rounded
    trainer, _ = run(tmp_path, partition="dirichlet", num_clients=3, rounds=1, dirichlet_alpha=0.3)
    assert trainer.round_reports[0].clients == 3


@pytest.mark.parametrize(
    "server",
    [{}, {"server_optimizer": "fedadam", "server_lr": 0.01, "aggregation": "rowwise"}],
    ids=["fedavg", "fedadam"],
)
def test_a_run_killed_mid_training_and_resumed_matches_an_uninterrupted_run(tmp_path, server):
    """The resume state holds everything a round depends on, the server optimizer's moments included."""
    straight, uninterrupted = run(tmp_path / "a", rounds=4, **server)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        crash_rounds_after(patch, 1)
        run(tmp_path / "b", rounds=4, **server)
    trainer, resumed = run(tmp_path / "b", rounds=4, **server)  # the same command again
    assert [segment["from_epoch"] for segment in trainer.segments] == [0, 2]  # rounds 0 and 1 not run again
    assert [report.round_idx for report in trainer.round_reports] == [0, 1, 2, 3]  # the killed process's too
    assert resumed == uninterrupted
    assert trainer.best_epoch == straight.best_epoch is not None  # the round of the best checkpoint, too
    # the client state store came back exactly: every client's private rows equal the uninterrupted run's
    assert trainer.server.store.states.keys() == straight.server.store.states.keys()
    for client_id, state in straight.server.store.states.items():
        for name, value in state.items():
            assert torch.equal(trainer.server.store.states[client_id][name], value), (client_id, name)


def test_runs_of_other_settings_never_resume_from_each_others_state(tmp_path):
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        crash_rounds_after(patch, 0)
        run(tmp_path, rounds=3)
    killed = list((tmp_path / "saved").glob("*.resume.pth"))
    assert len(killed) == 1
    # same model, dataset and seed, experts off: its own resume file, a run from round 0
    trainer, _ = run(tmp_path, rounds=3, feature_id_field=None)
    assert [report.round_idx for report in trainer.round_reports] == [0, 1, 2]
    assert trainer.resume_file != killed[0] and killed[0].exists()  # the killed run can still resume
    trainer.resume_file.write_bytes(killed[0].read_bytes())  # a file under the right name, from other settings
    with pytest.raises(RuntimeError, match="other settings"):
        run(tmp_path, rounds=3, feature_id_field=None)


def test_the_backend_setting_picks_the_execution_and_a_vectorized_run_trains(tmp_path):
    config, _, (train_data, _, _), model = tiny_run(tmp_path, **FEDERATED)
    # auto on a CPU: the tiny dataset's round (12 one-user clients, ~1 step each) is too small for Ray
    trainer = FederatedTrainer(config, model)
    server = trainer.build_server(train_data)
    assert trainer.expected_round_steps(server.clients, server.windows, server.strategy) < AUTO_RAY_MIN_STEPS
    assert server.backend.name == "sequential"
    multicore = auto_backend(torch.device("cpu"), usable_cpus(), AUTO_RAY_MIN_STEPS, ray_installed=True)
    assert trainer.build_backend(steps_per_round=AUTO_RAY_MIN_STEPS).name == multicore  # a round large enough
    config, _, _, model = tiny_run(tmp_path, **FEDERATED, federated_backend="simulated")
    with pytest.raises(ValueError, match="federated_backend must be"):
        FederatedTrainer(config, model).build_backend()
    trainer, test_result = run(tmp_path, federated_backend="vectorized", vectorized_chunk_targets=16, rounds=2)
    assert trainer.build_backend().chunk_targets == 16
    assert [report.clients for report in trainer.round_reports] == [12, 12]
    assert trainer.round_reports[-1].peak_rss_mb > 10
    assert (
        0.0 <= test_result["ndcg@10"] <= 1.0 and int(trainer.model.memory.prototype_valid.sum()) >= 1
    )  # merged prototypes


def test_a_time_budget_stops_the_run_after_the_round_that_spends_it(tmp_path):
    trainer, _ = run(tmp_path, rounds=50, time_budget_s=1e-9)
    assert len(trainer.round_reports) == 1  # the first round already spent it
    assert trainer.round_reports[0].elapsed_seconds > 0


def test_server_settings_reach_the_strategy(tmp_path):
    config, _, (train_data, _, _), model = tiny_run(
        tmp_path, **FEDERATED, server_optimizer="fedyogi", server_lr=0.05, aggregation="sum", local_optimizer="sgd"
    )
    trainer = FederatedTrainer(config, model)
    server = trainer.build_server(train_data)
    optimizer = server.strategy.server_optimizer
    assert (optimizer.name, optimizer.lr, optimizer.tau) == ("fedyogi", 0.05, 0.001)  # tau from federated.yaml
    assert server.strategy.aggregation == "sum" and trainer.settings.local_optimizer == "sgd"
    assert server.row_shapes == {"item_embedding.weight": model.item_embedding.weight.shape}


def test_the_resume_state_is_saved_at_most_every_resume_every_s(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        saved_rounds = []
        real_save = FederatedTrainer._save_resume_state
        patch.setattr(
            FederatedTrainer,
            "_save_resume_state",
            lambda self, round_idx: saved_rounds.append(round_idx) or real_save(self, round_idx),
        )
        run(tmp_path / "every", rounds=3)
        assert saved_rounds == [0, 1, 2]
        saved_rounds.clear()
        run(tmp_path / "rarely", rounds=3, resume_every_s=1e9)
        assert saved_rounds == []  # no round ended a whole interval after the last save


def test_auto_runs_ray_on_a_multicore_cpu_for_rounds_of_32_steps_and_sequential_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_backend(cpu, 2, 32, ray_installed=True) == "ray"
    assert auto_backend(cpu, 2, 31, ray_installed=True) == "sequential"  # too small to repay the state shipping
    assert auto_backend(cpu, 1, 1000, ray_installed=True) == "sequential"  # one core: nothing to share
    assert auto_backend(cpu, 16, 1000, ray_installed=False) == "sequential"
    assert auto_backend(cuda, 16, 1000, ray_installed=True) == "sequential"  # until gpu_check.sh has passed


@pytest.mark.parametrize(("rounds", "eval_every", "validated"), [(3, 25, [2]), (5, 2, [1, 3, 4]), (2, 1, [0, 1])])
def test_the_last_round_is_always_validated_so_a_run_keeps_a_model_to_test(tmp_path, rounds, eval_every, validated):
    # the federated quick start (--rounds=20 with federated.yaml's eval_every: 25) once ended without a checkpoint
    trainer, test_result = run(tmp_path, rounds=rounds, eval_every=eval_every)
    assert [report.round_idx for report in trainer.round_reports if report.valid_score is not None] == validated
    assert trainer.best_epoch in validated and "ndcg@10" in test_result


def test_a_time_budget_spent_between_validations_validates_the_round_that_spent_it(tmp_path):
    trainer, test_result = run(tmp_path, rounds=50, eval_every=25, time_budget_s=1e-9)
    (only,) = trainer.round_reports  # the budget is spent in round 0, which is then validated and tested
    assert only.valid_score is not None and trainer.best_epoch == 0 and "ndcg@10" in test_result


def test_dropped_clients_do_not_train_keep_their_state_and_the_rest_are_renormalised(tmp_path):
    from recbole_feddmmr.federated.server import Availability

    config, _, (train_data, _, _), model = tiny_run(tmp_path, **FEDERATED, client_dropout=0.5)
    trainer = FederatedTrainer(config, model)
    server = trainer.build_server(train_data)
    answering = Availability(0.5, None, config["seed"]).answering(0, server.clients)
    dropped = [client for client in server.clients if client not in answering]
    assert 0 < len(dropped) < len(server.clients)
    before = {client.client_id: server.store.client_state(client) for client in dropped}
    report = server.run_round(0)
    assert report.dropped == len(dropped) and report.clients == len(answering)
    for client in dropped:  # never trained: no stored state, the initial rows it had
        for name, rows in server.store.client_state(client).items():
            assert torch.equal(rows, before[client.client_id][name]), name
    # the aggregate is the weighted mean over the answering clients alone: the same round without dropout but
    # with exactly those clients selected gives the same parameters
    again_config, _, _, again_model = tiny_run(tmp_path / "again", **FEDERATED)
    again = FederatedTrainer(again_config, again_model).build_server(train_data)
    _, instructions = again.strategy.configure_fit(
        0, len(again.clients), again.global_params, again.settings, len(again.windows), again.row_shapes
    )
    mine = [again.clients[c.client_id] for c in answering]
    results = again.backend.run(again.model, mine, instructions, again.windows, again.store)
    expected = again.strategy.aggregate_fit(again.global_params, results, again.row_shapes, 0).parameters
    for name, value in expected.items():
        torch.testing.assert_close(server.global_params[name], value, msg=name)


def test_a_round_takes_no_update_after_its_deadline(tmp_path):
    trainer, _ = run(tmp_path, rounds=1, round_deadline_s=1e-9)
    (report,) = trainer.round_reports
    assert report.late == 1 and report.clients == 0  # the first result already came late; the rest never ran
