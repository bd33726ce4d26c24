"""Federated FedDMMR: partitions, the server's strategy, clients and execution backends.

Federation knows the model only through the Protocols of ``contracts.py``; the model knows nothing of
federation. Importing this package registers its trainer as the ``federated`` training mode of the registry
(what ``federated: True`` runs).
"""

from recbole_feddmmr.federated.trainer import FederatedTrainer
from recbole_feddmmr.registry import register_mode

register_mode("federated", FederatedTrainer)

__all__ = ["FederatedTrainer"]
