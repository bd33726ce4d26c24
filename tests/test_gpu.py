"""The federated simulation on CUDA: tiny runs with each backend, the backends' agreement, the resume state.

All marked ``gpu``: skipped without a CUDA device (tests/conftest.py); scripts/gpu_check.sh runs them.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import crash_rounds_after, tiny_run
from test_federated_round import BACKEND_SETTINGS, assert_backends_compute_the_same_rounds

from recbole_feddmmr.checkpoints import load_trusted
from recbole_feddmmr.federated.trainer import FederatedTrainer

pytestmark = pytest.mark.gpu

FEDERATED = {
    "federated": True,
    "rounds": 2,
    "local_batch_size": 8,
    "num_memory_prototypes": 2,
    "memory_surprise_threshold": 0.0,  # every positive written: memories large enough for two prototypes
    "prototype_min_entries": 1,
    "stopping_step": 5,
    "vectorized_chunk_targets": 16,
    "clients_per_round": None,
    "eval_every": 1,
    "resume_every_s": 0,
}


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_a_tiny_federated_run_trains_on_cuda(tmp_path, backend):
    config, _, (train_data, valid_data, test_data), model = tiny_run(
        tmp_path, "cuda", federated_backend=backend, **FEDERATED
    )
    initial = {name: value.detach().clone() for name, value in model.named_parameters()}
    trainer = FederatedTrainer(config, model)
    assert trainer.build_backend().name == backend
    trainer.fit(train_data, valid_data, saved=True)

    reports = trainer.round_reports
    assert [report.round_idx for report in reports] == [0, 1]
    assert all(report.clients == 12 and report.bytes_up > 0 for report in reports)
    assert all(math.isfinite(report.mean_loss) and report.mean_loss > 0 for report in reports)
    assert all(report.valid_score is not None and math.isfinite(report.valid_score) for report in reports)
    assert math.isfinite(trainer.best_valid_score)
    # the model, its memory and the windows stayed on the GPU, and training moved the weights there
    assert all(value.device.type == "cuda" for value in model.state_dict().values())
    assert trainer.sequence_windows(train_data).windows.device.type == "cuda"
    changed = [name for name, value in model.named_parameters() if not torch.equal(value, initial[name])]
    assert {"item_embedding.weight", "user_embedding.weight"} <= set(changed)
    assert len(changed) > len(initial) // 2
    assert bool((model.memory.item_ids >= 0).any())  # memories were written on the GPU
    assert int(model.memory.prototype_valid.sum()) == 2  # the CPU k-means prototypes reached the GPU memory
    test_result = trainer.evaluate(test_data, load_best_model=True)  # RecBole's checkpoint, back onto CUDA
    assert 0.0 <= test_result["ndcg@10"] <= 1.0


@pytest.mark.parametrize("settings", BACKEND_SETTINGS)
def test_sequential_and_vectorized_backends_compute_the_same_rounds_on_cuda(tmp_path, settings):
    assert_backends_compute_the_same_rounds(tmp_path, settings, "cuda")


def test_the_resume_state_of_a_cuda_run_holds_and_restores_the_cuda_rng(tmp_path):
    config, _, (train_data, valid_data, _), model = tiny_run(tmp_path, "cuda", **FEDERATED)
    killed = FederatedTrainer(config, model)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        crash_rounds_after(patch, 0)
        killed.fit(train_data, valid_data, saved=True)
    state = load_trusted(killed.resume_file, map_location="cpu")
    saved_rng = state["rng"]["cuda"]
    assert len(saved_rng) == torch.cuda.device_count()

    config, _, (train_data, _, _), model = tiny_run(tmp_path, "cuda", **FEDERATED)  # the same command again
    trainer = FederatedTrainer(config, model)
    assert trainer.resume_file == killed.resume_file
    torch.cuda.manual_seed_all(12345)  # any other CUDA random stream
    server = trainer.build_server(train_data)
    trainer._resume_if_interrupted(server)
    assert trainer.start_epoch == 1
    assert torch.equal(torch.cuda.get_rng_state(), saved_rng[torch.cuda.current_device()])
    assert all(value.device.type == "cuda" for value in model.state_dict().values())
    assert all(value.device.type == "cuda" for value in server.global_params.values())
    trainer.fit(train_data, valid_data, saved=True)  # and the resumed run finishes
    assert [report.round_idx for report in trainer.round_reports] == [1]
