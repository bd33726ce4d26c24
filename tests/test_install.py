"""A non-editable install (what scripts/install.sh does) carries the properties with the package."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_installed_package_finds_its_properties_outside_the_source_tree(tmp_path):
    try:
        distribution = importlib.metadata.distribution("recbole_feddmmr")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("recbole_feddmmr is not installed: run `bash scripts/install.sh`")
    if distribution.read_text("direct_url.json") and json.loads(distribution.read_text("direct_url.json")).get(
        "dir_info", {}
    ).get("editable"):
        pytest.skip("editable install: the properties come from the source tree")
    probe = (
        "import recbole_feddmmr, recbole_feddmmr.config as c;"
        "print(recbole_feddmmr.__file__); print(c.properties_dir());"
        "cfg = c.Config(model='UR4RecV2MoE', dataset='ml-100k', config_dict={'state': 'WARNING'});"
        "print(cfg['sasrec_hidden_dim'], cfg['valid_metric'], cfg['data_path'])"
    )
    completed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    package_file, properties, values = completed.stdout.strip().splitlines()[-3:]
    assert not package_file.startswith(str(REPO))  # the installed copy, not this checkout
    assert Path(properties, "model", "UR4RecV2MoE.yaml").is_file()
    assert values.split() == ["128", "NDCG@10", str(tmp_path / "dataset_atomic" / "ml-100k")]  # absolute
