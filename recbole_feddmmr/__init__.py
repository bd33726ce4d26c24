"""recbole_feddmmr: FedDMMR (federated multimodal memory-augmented sequential
recommendation) as a RecBole plugin."""

from recbole_feddmmr import compat  # noqa: F401  (numpy aliases before anything imports RecBole)

__version__ = "0.1.0"
