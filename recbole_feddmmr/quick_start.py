"""Entry points: one training + evaluation run, and the objective a hyperparameter search calls.

Deliberately free of ``ray`` (``recbole.quick_start`` imports it at import time),
so a training run needs no Ray installation.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed

from recbole_feddmmr.config import Config
from recbole_feddmmr.datasets import check_item_features, ensure_dataset
from recbole_feddmmr.utils import get_model, get_trainer


def prepare_run(model: str | None = None, dataset: str | None = None, config_file_list=None, config_dict=None):
    """Config, datasets and model of one run -> (config, (train, valid, test), model)."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = logging.getLogger()
    logger.info(" ".join(sys.argv))
    logger.info(config)
    ensure_dataset(config["dataset"], config["data_path"], show_progress=config["show_progress"])
    check_item_features(config)
    full_dataset = create_dataset(config)
    logger.info(full_dataset)
    splits = data_preparation(config, full_dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_instance = get_model(config["model"])(config, splits[0]._dataset).to(config["device"])
    logger.info(model_instance)
    return config, splits, model_instance


def run_recbole_feddmmr(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    saved: bool = True,
) -> dict[str, Any]:
    """Train with early stopping on validation, then evaluate the best checkpoint on test."""
    config, (train_data, valid_data, test_data), model_instance = prepare_run(
        model, dataset, config_file_list, config_dict
    )
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], config["federated"])(config, model_instance)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    logger = logging.getLogger()
    logger.info(f"best valid : {best_valid_result}")
    logger.info(f"test result: {test_result}")
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "checkpoint": trainer.saved_model_file if saved else None,
    }


def objective_function(config_dict=None, config_file_list=None, saved: bool = True) -> dict[str, Any]:
    """What a hyperparameter search calls for one trial (RecBole's signature)."""
    return run_recbole_feddmmr(config_dict=config_dict, config_file_list=config_file_list, saved=saved)
