"""Federated FedDMMR: partitions, the server's strategy, clients and execution backends.

Federation knows the model only through its parameters and its loss; the model knows nothing of federation.
"""
