"""A killed centralised run, rerun by the same command, ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, tiny_run

from recbole_feddmmr.errors import CheckpointError
from recbole_feddmmr.registry import get_trainer
from recbole_feddmmr.resumable import ResumableFitMixin

# four epochs, a validation and a resume-state save after each; no early stop within them
RUN = {"epochs": 4, "stopping_step": 10, "resume_every_s": 0}


def trainer_for(tmp_path, model: str, crash_after: int | None = None, **overrides):
    """A fresh model and trainer, as a new process running the same command builds them; with ``crash_after``
    every epoch after that one raises KeyboardInterrupt, as a kill would."""
    config, _, splits, net = tiny_run(tmp_path, model=model, **{**RUN, **overrides})
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    if crash_after is not None:
        train_epoch = trainer._train_epoch

        def crashing_epoch(train_data, epoch_idx, *args, **kwargs):
            if epoch_idx > crash_after:
                raise KeyboardInterrupt("killed")
            return train_epoch(train_data, epoch_idx, *args, **kwargs)

        trainer._train_epoch = crashing_epoch
    return trainer, splits


def fit(trainer, splits, **kwargs):
    """``trainer.fit`` recording each validation in ``run_records`` (read at call time: a resume replaces it)."""
    train_data, valid_data, _ = splits
    trainer.run_records["curve"] = []

    def record(epoch: int, score: float) -> None:
        trainer.run_records["curve"].append((epoch, score))

    return trainer.fit(train_data, valid_data, saved=True, callback_fn=record, **kwargs)


@pytest.mark.parametrize("model", ["SASRec", "BERT4Rec", "UR4RecV2MoE"])
def test_a_killed_run_resumed_by_the_same_command_matches_the_uninterrupted_run(tmp_path, model):
    """RecBole's trainer (its dataloader shuffles with a generator of its own; BERT4Rec masks with Python's
    random) and the plugin's window trainer (its memory is model state)."""
    straight, splits = trainer_for(tmp_path / "a", model)
    fit(straight, splits)
    expected = straight.evaluate(splits[2], load_best_model=True)

    killed, splits = trainer_for(tmp_path / "b", model, crash_after=1)
    with pytest.raises(KeyboardInterrupt):
        fit(killed, splits)
    assert killed.resume_file.exists()

    resumed, splits = trainer_for(tmp_path / "b", model)
    assert resumed.resume_file == killed.resume_file  # same settings, same file
    fit(resumed, splits)
    assert resumed.start_epoch == 2  # epochs 0 and 1 were not trained again
    assert resumed.evaluate(splits[2], load_best_model=True) == expected
    assert resumed.best_epoch == straight.best_epoch is not None
    assert resumed.saved_model_file == killed.saved_model_file  # the killed process's best checkpoint
    assert resumed.train_loss_dict == straight.train_loss_dict  # every epoch's loss, the killed process's too
    assert resumed.run_records["curve"] == straight.run_records["curve"]  # what the caller recorded, in full
    assert [segment["from_epoch"] for segment in resumed.segments] == [0, 2]
    for name, value in straight.model.state_dict().items():  # the last epoch's weights, not only the best
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert not resumed.resume_file.exists()  # finished: the same command starts afresh


def test_a_run_killed_after_its_last_validation_is_not_trained_again(tmp_path):
    """Killed between the last validation's save and the end of fit: the rerun returns the best result at once
    (RecBole's fit, started past its last epoch, would overwrite the best checkpoint with the last weights)."""
    straight, splits = trainer_for(tmp_path, "SASRec", epochs=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(straight.resume_file), "unlink", lambda *args, **kwargs: None)  # the kill
        best = fit(straight, splits)
    best_checkpoint = Path(straight.saved_model_file).read_bytes()

    rerun, splits = trainer_for(tmp_path, "SASRec", epochs=2)
    rerun._train_epoch = lambda *args, **kwargs: pytest.fail("trained again")
    assert fit(rerun, splits) == best
    assert Path(rerun.saved_model_file).read_bytes() == best_checkpoint
    assert not rerun.resume_file.exists()


def test_resume_states_of_other_settings_or_without_their_checkpoint_are_refused(tmp_path):
    killed, splits = trainer_for(tmp_path, "SASRec", crash_after=0)
    with pytest.raises(KeyboardInterrupt):
        fit(killed, splits)

    other, splits = trainer_for(tmp_path, "SASRec", learning_rate=0.01)
    assert other.resume_file != killed.resume_file  # other settings: another name, a fresh run
    other.resume_file.write_bytes(killed.resume_file.read_bytes())  # under the right name, from other settings
    with pytest.raises(CheckpointError, match="other settings"):
        fit(other, splits)

    same, splits = trainer_for(tmp_path, "SASRec")
    Path(killed.saved_model_file).unlink()
    with pytest.raises(CheckpointError, match=r"best checkpoint .* is gone"):
        fit(same, splits)


def test_runs_without_checkpoints_neither_write_nor_read_resume_state(tmp_path):
    """A Ray Tune trial fits with saved=False: a resumed trial could not evaluate its best epoch."""
    trainer, splits = trainer_for(tmp_path, "SASRec", crash_after=0)
    assert isinstance(trainer, ResumableFitMixin)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(splits[0], splits[1], saved=False)
    assert not trainer.resume_file.exists()


def test_a_benchmark_cell_killed_mid_training_resumes_with_its_earlier_epochs(tmp_path):
    """The cell's epoch times, curve and metrics cover the killed process's epochs, and it says where it resumed."""
    from recbole.trainer import Trainer

    from recbole_feddmmr.experiments.runner import run_model

    def settings(folder: str) -> dict:
        return {**TINY_CONFIG, "checkpoint_dir": str(tmp_path / folder), **RUN, "epochs": 3}

    straight = run_model("SASRec", "tiny", settings("a"))
    real_epoch = Trainer._train_epoch

    def crashing_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx > 0:
            raise KeyboardInterrupt("killed")
        return real_epoch(self, train_data, epoch_idx, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Trainer, "_train_epoch", crashing_epoch)
        run_model("SASRec", "tiny", settings("b"))
    resumed = run_model("SASRec", "tiny", settings("b"))
    assert [segment["from_epoch"] for segment in resumed["segments"]] == [0, 1]
    assert "segments" not in straight
    assert resumed["epochs_trained"] == straight["epochs_trained"] == 3
    assert resumed["valid_curve"] == straight["valid_curve"]
    for split in ("test_full", "test_uni100", "test_cold"):
        assert resumed[split] == straight[split], split
    assert resumed["best_epoch"] == straight["best_epoch"]


def test_the_plateau_schedule_cuts_the_rate_after_patience_validations_without_a_better_one():
    """torch's ReduceLROnPlateau as the trainer builds it: validations 0.1, 0.2 improve; 0.2 (equal), 0.19 and
    0.18 do not, and the third of them (more than ``patience`` = 2) halves the rate; 0.3 improves again."""
    from recbole_feddmmr.trainer import plateau_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = plateau_schedule(optimizer, {"lr_plateau_factor": 0.5, "lr_plateau_patience": 2})
    rates = []
    for score in (0.1, 0.2, 0.2, 0.19, 0.18, 0.3, 0.3, 0.3, 0.3):
        schedule.step(score)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]
    assert plateau_schedule(optimizer, {"lr_plateau_factor": 0.0, "lr_plateau_patience": 2}) is None
    assert plateau_schedule(optimizer, {"lr_plateau_factor": None, "lr_plateau_patience": 2}) is None


@pytest.mark.parametrize(("factor", "patience"), [(1.0, 2), (-0.5, 2), (0.5, -1), (0.5, 1.5), (0.5, None)])
def test_a_plateau_schedule_with_a_meaningless_setting_is_refused(factor, patience):
    from recbole_feddmmr.errors import ConfigError
    from recbole_feddmmr.trainer import plateau_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="lr_plateau"):
        plateau_schedule(optimizer, {"lr_plateau_factor": factor, "lr_plateau_patience": patience})


def test_a_killed_run_with_a_plateau_schedule_resumes_at_the_rate_and_schedule_it_had(tmp_path):
    """Patience 0: every validation that is not a new best cuts the rate, so four epochs change it; the run
    killed after epoch 1 and resumed ends with the uninterrupted run's rates, weights and test result."""
    schedule = {"lr_plateau_factor": 0.5, "lr_plateau_patience": 0}
    straight, splits = trainer_for(tmp_path / "a", "UR4RecV2MoE", **schedule)
    fit(straight, splits)
    expected = straight.evaluate(splits[2], load_best_model=True)
    rates = [rate for _, rate in straight.run_records["learning_rate"]]
    assert len(rates) == 4 and rates == sorted(rates, reverse=True) and rates[-1] < straight.config["learning_rate"]
    first = straight.config["learning_rate"]
    assert all(round(math.log2(first / rate), 9).is_integer() for rate in rates)  # halvings of the first rate

    killed, splits = trainer_for(tmp_path / "b", "UR4RecV2MoE", crash_after=1, **schedule)
    with pytest.raises(KeyboardInterrupt):
        fit(killed, splits)
    resumed, splits = trainer_for(tmp_path / "b", "UR4RecV2MoE", **schedule)
    fit(resumed, splits)
    assert resumed.start_epoch == 2
    assert resumed.run_records["learning_rate"] == straight.run_records["learning_rate"]
    assert resumed.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == rates[-1]
    assert resumed.evaluate(splits[2], load_best_model=True) == expected
