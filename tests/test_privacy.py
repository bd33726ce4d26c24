"""User-level DP of federated rounds: clipping, noise, the accountant, and a private run end to end."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from conftest import crash_rounds_after, tiny_run
from dp_accounting import rdp

from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.aggregation import UpdateAccumulator
from recbole_feddmmr.federated.privacy import (
    PrivacyAccountant,
    PrivacySettings,
    add_noise,
    calibrate_noise_multiplier,
    clip_update,
    update_norm,
)
from recbole_feddmmr.federated.strategy import FedMemStrategy
from recbole_feddmmr.registry import get_trainer

PRIVATE = {
    "federated": True,
    "rounds": 3,
    "clients_per_round": 4,
    "eval_every": 1,
    "local_batch_size": 8,
    "dp_clip_norm": 0.5,
    "dp_noise_multiplier": 1.1,
    "resume_every_s": 0,
}


def test_a_clipped_upload_has_norm_at_most_c_and_a_small_one_is_untouched():
    update = {"w": torch.tensor([3.0, 4.0]), "rows": torch.tensor([[12.0]])}  # norm 13
    clipped = clip_update(update, 1.3)
    assert update_norm(clipped) == pytest.approx(1.3)
    torch.testing.assert_close(clipped["w"], torch.tensor([0.3, 0.4]))  # the direction is kept
    assert clip_update(update, 20.0) is update


def test_the_noise_has_the_configured_standard_deviation():
    generator = torch.Generator().manual_seed(0)
    noisy = add_noise({"w": torch.zeros(200_000, dtype=torch.float64)}, std=0.7, generator=generator)["w"]
    assert float(noisy.mean()) == pytest.approx(0.0, abs=0.01) and float(noisy.std()) == pytest.approx(0.7, rel=0.01)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_the_accountants_epsilon_is_dp_accountings_own(sampling):
    settings = PrivacySettings(clip_norm=1.0, noise_multiplier=0.74, delta=1e-3, sampling=sampling)
    accountant = PrivacyAccountant(settings, population=943, cohort=16)
    relation = dp_accounting.NeighboringRelation
    if sampling == "poisson":
        one = dp_accounting.PoissonSampledDpEvent(16 / 943, dp_accounting.GaussianDpEvent(0.74))
        reference = rdp.RdpAccountant(neighboring_relation=relation.ADD_OR_REMOVE_ONE)
    else:  # replacing one user moves the sum of clipped uploads by 2 C: the multiplier relative to it is halved
        one = dp_accounting.SampledWithoutReplacementDpEvent(943, 16, dp_accounting.GaussianDpEvent(0.74 / 2))
        reference = rdp.RdpAccountant(neighboring_relation=relation.REPLACE_ONE)
    reference.compose(dp_accounting.SelfComposedDpEvent(one, 2000))
    assert accountant.epsilon(2000) == pytest.approx(reference.get_epsilon(1e-3), rel=1e-9)
    assert accountant.epsilon(0) == 0.0 and accountant.step() == pytest.approx(accountant.epsilon(1))
    calibrated = calibrate_noise_multiplier(8.0, 1e-3, 2000, 943, 16, sampling)
    tight = PrivacyAccountant(PrivacySettings(1.0, calibrated, 1e-3, sampling), 943, 16)
    assert tight.epsilon(2000) <= 8.0 and tight.epsilon(2000) == pytest.approx(8.0, rel=0.02)


def test_the_server_adds_noise_to_the_sum_and_divides_by_the_expected_cohort():
    privacy = PrivacySettings(clip_norm=1.0, noise_multiplier=0.0, delta=1e-3, sampling="fixed")
    strategy = FedMemStrategy(clients_per_round=4, seed=1, privacy=privacy)
    strategy.cohort = 4  # what configure_fit sets: the clients a round expects
    accumulator = UpdateAccumulator("mean")
    for update in ([1.0, 0.0], [0.0, 1.0]):  # two of the four expected clients answered, each weighing 1
        accumulator.add({"w": torch.tensor(update)}, 1)
    update = strategy.private_update({"w": torch.zeros(2), "b": torch.zeros(1)}, accumulator, round_idx=0)
    torch.testing.assert_close(update["w"], torch.tensor([0.25, 0.25]))  # (sum + 0 noise) / 4, not / 2
    assert torch.equal(update["b"], torch.zeros(1))  # a parameter no client sent is noise alone (here none)
    with pytest.raises(ConfigError, match="rowwise divides a row"):
        FedMemStrategy(aggregation="rowwise", privacy=privacy)


def test_poisson_sampling_draws_each_client_with_its_probability():
    strategy = FedMemStrategy(clients_per_round=10, seed=2, sampling="poisson")
    sizes = [len(strategy.select_clients(round_idx, 1000)) for round_idx in range(300)]
    assert sum(sizes) / len(sizes) == pytest.approx(10, rel=0.1) and len(set(sizes)) > 3


def run(tmp_path, **overrides):
    config, _, (train_data, valid_data, _test_data), model = tiny_run(tmp_path, **{**PRIVATE, **overrides})
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], "federated")(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    return trainer


def test_a_private_run_clips_every_upload_accounts_every_round_and_sends_no_prototype(tmp_path, monkeypatch):
    from recbole_feddmmr.federated import client

    norms = []
    real_clip = client.clip_update

    def recording_clip(update, clip_norm):
        clipped = real_clip(update, clip_norm)
        norms.append(update_norm(clipped))
        return clipped

    monkeypatch.setattr(client, "clip_update", recording_clip)
    trainer = run(tmp_path)
    assert len(norms) == 3 * 4 and max(norms) <= 0.5 * (1 + 1e-6)  # float32 rounding
    epsilons = [report.epsilon for report in trainer.round_reports]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(trainer.accountant.epsilon(3))
    assert not trainer.model.memory.prototype_valid.any()  # no prototype was sent, merged or broadcast


def test_a_target_epsilon_stops_the_run_before_it_is_exceeded(tmp_path):
    trainer = run(tmp_path, rounds=50, dp_target_epsilon=None)
    budget = trainer.round_reports[1].epsilon  # what two rounds spend
    stopped = run(tmp_path / "again", rounds=50, dp_target_epsilon=budget)
    assert len(stopped.round_reports) == 2 and stopped.round_reports[-1].epsilon <= budget


def test_without_a_noise_multiplier_the_noise_is_calibrated_to_the_target(tmp_path):
    trainer = run(tmp_path, dp_noise_multiplier=None, dp_target_epsilon=5.0)
    assert trainer.round_reports[-1].epsilon == pytest.approx(5.0, rel=0.02)


def test_a_killed_private_run_resumes_with_its_accountant(tmp_path, monkeypatch):
    reference = run(tmp_path / "whole")
    crash_rounds_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.undo()
    resumed = run(tmp_path / "killed")
    assert resumed.accountant.rounds == 3
    assert [r.epsilon for r in resumed.round_reports] == [r.epsilon for r in reference.round_reports]
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)


def test_dp_settings_that_cannot_run_are_refused(tmp_path):
    from conftest import tiny_config

    from recbole_feddmmr.federated.settings import FederatedSettings

    with pytest.raises(ConfigError, match="need dp_clip_norm"):
        FederatedSettings.from_config(tiny_config(tmp_path, federated=True, dp_noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="adds no noise"):
        FederatedSettings.from_config(tiny_config(tmp_path, federated=True, dp_clip_norm=1.0))
    assert math.isinf(PrivacyAccountant(PrivacySettings(1.0, 0.0, 1e-3, "fixed"), 10, 2).epsilon(1))


def test_privacy_budget_table_is_monotone_and_its_calibrated_multipliers_spend_their_targets(capsys):
    from recbole_feddmmr.experiments.privacy_budget import budget_table, main

    budget = budget_table(943, 16, "fixed", 1e-3, [1.0, 2.0], [10, 100], [4.0])
    (low, high) = budget["epsilon"]
    assert low["epsilon"][0] < low["epsilon"][1] and high["epsilon"][0] < high["epsilon"][1]  # more rounds
    assert high["epsilon"][1] < low["epsilon"][1]  # more noise
    for rounds, noise in zip(budget["rounds"], budget["calibrated"][0]["noise_multiplier"], strict=True):
        spent = PrivacyAccountant(PrivacySettings(1.0, noise, 1e-3, "fixed"), 943, 16).epsilon(rounds)
        assert spent <= 4.0 * 1.001 and spent > 4.0 * 0.95  # the smallest noise that spends at most the target
    poisson = budget_table(943, 16, "poisson", 1e-3, [1.0], [100], [])
    assert poisson["epsilon"][0]["epsilon"][0] < low["epsilon"][1]  # fixed cohorts: replace-one, twice the reach
    with pytest.raises(ConfigError, match="clients_per_round"):
        budget_table(943, 2000, "fixed", 1e-3, [1.0], [10], [])
    report = main(["--users", "100", "--noise_multipliers", "1", "--rounds", "10", "--target_epsilons", "8"])
    assert report["budget"]["delta"] == pytest.approx(0.01)  # 1 / users, as dp_delta defaults
    assert "| 1 | " in capsys.readouterr().out
    from recbole_feddmmr.experiments.report import format_results

    assert "target epsilon" in format_results(report)  # the report command prints its file
