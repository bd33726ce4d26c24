"""Shared fixtures: the tiny atomic dataset of tests/test_data/tiny (see make_tiny.py), and the ``gpu`` marker:
tests that need a CUDA device are marked ``@pytest.mark.gpu`` and skipped where none exists
(``python -m pytest -m gpu tests`` runs only them; scripts/gpu_check.sh does on a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

TEST_DATA = Path(__file__).parent / "test_data"
REPO = Path(__file__).resolve().parents[1]

# the tiny dataset's columns, feature sizes and model sizes are its own yaml's (tests/test_data/tiny/tiny.yaml)
TINY_YAML = yaml.safe_load((TEST_DATA / "tiny" / "tiny.yaml").read_text())
TINY_CONFIG = {
    "data_path": str(TEST_DATA),
    "epochs": 1,
    "show_progress": False,
    "state": "WARNING",
}


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="also run the documented experiment commands (tests/test_docs.py)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "ray: starts a local Ray (2 CPUs); runs on CI's 2 cores, skip with -m 'not ray'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def command(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``python ARGUMENTS`` in ``tmp_path``, importing this checkout's package (as the tests do)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )


def tiny_config(tmp_path: Path, device: str = "cpu", **overrides):
    """The tiny dataset's Config on ``device``: CPU unless a test asks for CUDA (RecBole itself would pick
    CUDA wherever one exists, and the tests' models and windows are built on the CPU)."""
    from recbole_feddmmr.config import Config

    settings = dict(TINY_CONFIG, checkpoint_dir=str(tmp_path / "saved"), **overrides)
    config = Config(model=settings.pop("model", "UR4RecV2MoE"), dataset="tiny", config_dict=settings)
    config["device"] = torch.device(device)
    return config


def tiny_run(tmp_path: Path, device: str = "cpu", **overrides):
    """(config, dataset, (train, valid, test), model) on the tiny dataset, the model on ``device``."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_feddmmr.registry import get_model

    config = tiny_config(tmp_path, device, **overrides)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    splits = data_preparation(config, dataset)
    init_seed(config["seed"], True)
    model = get_model(config["model"])(config, splits[0]._dataset).to(config["device"])
    return config, dataset, splits, model


@pytest.fixture
def tiny(tmp_path):
    return tiny_run(tmp_path)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Logs (RecBole writes ./log, ./log_tensorboard) go to the test's temporary folder; RecBole runs on
    today's numpy and pandas (what every entry point installs)."""
    from recbole_feddmmr import compat

    compat.install()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


def crash_rounds_after(monkeypatch, last_round: int) -> None:
    """Make every federated round after ``last_round`` raise KeyboardInterrupt, as a killed run would."""
    from recbole_feddmmr.federated.server import FedMemServer

    real_round = FedMemServer.run_round

    def crashing_round(self, round_idx):
        if round_idx > last_round:
            raise KeyboardInterrupt("killed")
        return real_round(self, round_idx)

    monkeypatch.setattr(FedMemServer, "run_round", crashing_round)
