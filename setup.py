"""Packaging for recbole_feddmmr.

The yaml files of the top-level ``properties/`` folder are shipped inside the
package as ``recbole_feddmmr/properties`` (``package_dir`` below), so a plain
``pip install .`` (not only an editable one) still finds them.

RecBole itself is deliberately *not* in ``install_requires``: its 1.2.1 wheel pins
``ray<=2.6.3`` (no Python 3.12 wheels, broken on numpy 2), so
``scripts/install.sh`` installs it with ``--no-deps`` next to requirements.txt.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name: str = "requirements.txt") -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="recbole_feddmmr",
    version="0.1.0",
    description="FedDMMR: federated multimodal memory-augmented sequential recommendation, a RecBole plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["recbole_feddmmr", "recbole_feddmmr.*"]), "recbole_feddmmr.properties"],
    package_dir={"recbole_feddmmr.properties": "properties"},
    package_data={"recbole_feddmmr.properties": ["*.yaml", "model/*.yaml", "dataset/*.yaml"]},
    install_requires=read_requirements(),
    extras_require={"dev": ["pytest>=8", "ruff>=0.6"], "flower": read_requirements("requirements-flower.txt")},
    py_modules=["run_recbole_feddmmr"],
    entry_points={"console_scripts": ["recbole-feddmmr=run_recbole_feddmmr:cli"]},
)
