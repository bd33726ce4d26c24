"""The fixes of ``compat.py`` that change how fast or whether RecBole runs."""

from __future__ import annotations

from pathlib import Path

from conftest import command

REPORT_ANOMALY = "import torch; print(torch.is_anomaly_enabled())"


def anomaly_mode_after(tmp_path: Path, code: str) -> str:
    """Torch's anomaly-detection switch after ``code`` ran in a fresh interpreter."""
    result = command(tmp_path, "-c", f"{code}; {REPORT_ANOMALY}")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-1]


def test_recbole_model_import_turns_anomaly_detection_on(tmp_path: Path) -> None:
    # the cause the guard exists for: if RecBole stops doing this, keep_anomaly_mode can go
    assert anomaly_mode_after(tmp_path, "import recbole.model.sequential_recommender") == "True"


def test_the_plugin_imports_recbole_models_with_anomaly_detection_left_off(tmp_path: Path) -> None:
    code = (
        "import recbole_feddmmr.model; from recbole_feddmmr.registry import get_model; "
        "get_model('SASRec'); get_model('SINE'); get_model('UR4RecV2MoE')"
    )
    assert anomaly_mode_after(tmp_path, code) == "False"


def test_a_user_who_asked_for_anomaly_detection_keeps_it(tmp_path: Path) -> None:
    code = "import torch; torch.autograd.set_detect_anomaly(True); import recbole_feddmmr.model"
    assert anomaly_mode_after(tmp_path, code) == "True"
