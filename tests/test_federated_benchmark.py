"""The federated benchmark command on the tiny dataset: every figure it reports is consistent with its parts."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_CONFIG, TINY_YAML

from recbole_feddmmr.experiments.federated_benchmark import main


def test_federated_benchmark_reports_accuracy_speed_experts_and_bytes(tmp_path):
    out = tmp_path / "federated.json"
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), num_memory_prototypes=2, eval_every=1)
    settings.pop("epochs")
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    runs = ["UR4RecV2MoE[federated=True]", "UR4RecV2MoE[federated=True,feature_id_field=null]", "SASRec"]
    broken = "UR4RecV2MoE[federated=True,loss_type=hinge]"  # fails at once: the other runs must still report
    arguments = ["--dataset", "tiny", "--runs", *runs, broken, "--rounds", "2", "--sasrec_epochs", "1", "--jobs", "2"]
    report = main([*arguments, "--chunk_targets", "16", "--sampled_clients", "3", "--out", str(out), *overrides])
    assert json.loads(out.read_text()) == report
    assert main(["--report", str(out)]) == report

    federated, plain, sasrec = report["runs"]
    assert [run["label"] for run in report["runs"]] == runs
    (failure,) = report["failed"]
    assert failure["task"] == broken and "loss_type must be" in failure["error"]
    assert federated["epochs_trained"] == plain["epochs_trained"] == 2  # rounds
    for run in (federated, plain):
        rounds = run["rounds"]
        assert run["bytes_up_total"] == sum(r["bytes_up"] for r in rounds) > 0
        assert all(r["clients"] == 12 for r in rounds)  # one client per user, all of them every round
    assert "rounds" not in sasrec and "expert_share" not in sasrec
    # the router's shares are a distribution; with the experts off everything is the sequential expert's
    assert sum(federated["expert_share"].values()) == pytest.approx(1.0)
    assert plain["expert_share"] == pytest.approx({"sequential": 1.0, "visual": 0.0, "semantic": 0.0})
    # the plain model sends no prototypes: fewer bytes up per round than the model with memory features
    assert plain["rounds"][0]["bytes_up"] < federated["rounds"][0]["bytes_up"]
    ratio = report[f"ratio {runs[0]} / {runs[2]}"]
    assert ratio["test_full_ndcg@10"] == pytest.approx(
        federated["test_full"]["ndcg@10"] / sasrec["test_full"]["ndcg@10"]
    )

    speed = report["speed"]
    sequential, vectorized = speed["rounds"]["sequential"], speed["rounds"]["vectorized"]
    assert sequential["clients"] == vectorized["clients"] == 12
    # the same messages, whoever ran the clients, but for how many prototypes each sends: the backends draw
    # dropout masks differently, so memories (and so the clusters big enough to send) may differ
    prototype_bytes = 2 * (TINY_YAML["text_dim"] + TINY_YAML["visual_dim"] + 1) * 4  # K = 2 per client
    assert abs(sequential["bytes_up"] - vectorized["bytes_up"]) <= 12 * prototype_bytes
    assert speed["vectorized_over_sequential"] == pytest.approx(vectorized["seconds"] / sequential["seconds"])
    epochs = speed["centralised_epoch_seconds"], speed["centralised_epoch_seconds_after"]  # around the rounds
    assert speed["round_over_epoch"]["sequential"] == pytest.approx(sequential["seconds"] / (sum(epochs) / 2))
    assert min(sequential["peak_rss_mb"], vectorized["peak_rss_mb"]) > 10
    # a sampled round of 3 of the 12 clients, timed in the same process with the first backend
    sampled = speed["sampled_round"]
    assert (sampled["clients"], sampled["backend"]) == (3, "sequential")
    assert speed["sampled_over_full"] == pytest.approx(sampled["seconds"] / sequential["seconds"])
    assert speed["sampled_clients_over_all"] == pytest.approx(3 / 12)
    # the broadcast goes to the selected clients only (the merged prototypes may be fewer from fewer clients)
    assert 0.95 * sequential["bytes_down"] * 3 / 12 <= sampled["bytes_down"] <= sequential["bytes_down"] * 3 / 12


def test_payoff_is_the_smallest_client_count_where_a_ray_pool_matches_vectorized():
    from recbole_feddmmr.experiments.federated_benchmark import payoff

    rows = [("vectorized", 16, 1.0), ("ray:2", 16, 3.0), ("vectorized", 64, 2.0), ("ray:2", 64, 2.0)]
    rows += [("vectorized", 256, 8.0), ("ray:2", 256, 4.0), ("ray:4", 256, 10.0)]
    result = payoff({"rounds": rows_of(*rows)})
    assert result["over_vectorized"] == {16: {"ray:2": 3.0}, 64: {"ray:2": 1.0}, 256: {"ray:2": 0.5, "ray:4": 1.25}}
    assert result["ray_pays_off_from_clients"] == 64
    assert payoff({"rounds": rows_of(("vectorized", 16, 1.0), ("ray:2", 16, 2.0))})["ray_pays_off_from_clients"] is None


def rows_of(*rows):
    return [{"backend": b, "clients": c, "seconds": s} for b, c, s in rows]


@pytest.mark.ray
def test_round_sweep_times_every_backend_at_every_client_count(tmp_path):
    out = tmp_path / "sweep.json"
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), num_memory_prototypes=2)
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    arguments = ["--dataset", "tiny", "--sweep_backends", "vectorized", "ray:2", "--sweep_clients", "4", "0"]
    report = main([*arguments, "--chunk_targets", "16", "--out", str(out), *overrides])
    rows = {(row["backend"], row["clients"]): row["seconds"] for row in report["sweep"]["rounds"]}
    assert set(rows) == {("vectorized", 4), ("vectorized", 12), ("ray:2", 4), ("ray:2", 12)}  # 0 = all 12 users
    assert all(seconds > 0 for seconds in rows.values())
    assert report["sweep"]["payoff"]["over_vectorized"][12] == {"ray:2": rows[("ray:2", 12)] / rows[("vectorized", 12)]}
    assert json.loads(out.read_text())["sweep"]["rounds"] == report["sweep"]["rounds"]


def test_settings_cost_times_each_setting_from_one_start_and_counts_the_dense_uploads(tmp_path):
    out = tmp_path / "cost.json"
    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), num_memory_prototypes=2)
    settings.pop("epochs")
    overrides = [f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in settings.items()]
    labels = ["FedAvg[]", "DP[dp_clip_norm=1.0,dp_noise_multiplier=1.0]", "secure[secure_aggregation=true]"]
    arguments = ["--dataset", "tiny", "--compare_settings", *labels, "--compare_rounds", "2", "--sampled_clients", "3"]
    report = main([*arguments, "--out", str(out), *overrides])
    assert json.loads(out.read_text()) == report and main(["--report", str(out)]) == report
    fedavg, dp, secure = report["cost"]["settings"]
    assert [row["label"] for row in report["cost"]["settings"]] == labels
    assert all(row["clients"] == 3 for row in (fedavg, dp, secure))
    assert fedavg["x_seconds"] == 1.0 and dp["x_seconds"] == pytest.approx(
        dp["seconds_per_round"] / fedavg["seconds_per_round"]
    )
    assert secure["x_bytes_up"] == pytest.approx(secure["bytes_up_per_round"] / fedavg["bytes_up_per_round"])
    # secure aggregation uploads every item row (dense) and no prototypes; DP sends no prototypes either
    assert dp["bytes_up_per_round"] < fedavg["bytes_up_per_round"] < secure["bytes_up_per_round"]
    assert secure["settings"] == {"secure_aggregation": True}
    with pytest.raises(SystemExit):
        main(["--dataset", "tiny", "--compare_settings", "FedAvg[]", "--sampled_clients", "0", *overrides])
