"""FedDMMR as a Flower app (optional: ``pip install .[flower]``; nothing outside this package imports flwr).

The project's own server algorithm (:class:`~recbole_feddmmr.federated.strategy.FedMemStrategy`) runs as a
Flower ``Strategy`` in a ``ServerApp``; a ``ClientApp`` trains the project's clients on its SuperNode with
their private state (user rows, memory) kept in Flower's ``Context.state``, and evaluates its own users'
next items. ``records.py`` converts the project's messages to Flower's records, ``node.py`` is what runs
on a SuperNode, ``strategy.py`` what runs on the server, ``app.py`` builds both apps and runs a simulation.
"""
