"""The client state store: every client's private state, held per client and never in the server's model.

A model names its per-user state in ``per_user_state``: state-dict entries whose dim 0 is the user id
(UR4RecV2MoE: the user embedding's rows and every per-user table of LocalDynamicMemory). That state
belongs to the clients. The store keeps it keyed by client id, as in-memory tensors holding only that
client's users' rows, in the order of ``client.user_ids``; a client that has never trained has no
entry and starts from the model's initial rows.

The simulation runs clients on one model object. Before a client (or, for the vectorized backend, a
chunk of clients) trains, :meth:`ClientStateStore.load` puts the private rows of exactly those clients
into the model, which then has as many user rows as those clients have users: the model sees
*resident rows*, and :class:`Residents` maps a batch's user ids onto them. Afterwards
:meth:`ClientStateStore.save` takes the rows back into the store. So a round costs memory and time in
proportion to its clients, and a client's training can read no other client's rows: they are not in
the model. The server keeps only the shared parameters, its optimizer state and the merged prototypes.

Evaluation scores every user with RecBole's evaluator, which indexes user rows by user id, so before
it :meth:`ClientStateStore.assemble` writes every user's rows (a client's stored rows, or the initial
ones) into full ``[num_users, ...]`` tables: the assembled model is what today's centralised model is,
and the best-validation checkpoint is saved from it. Resume files hold :meth:`state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from recbole_feddmmr.errors import CheckpointError


class Client(Protocol):
    client_id: int
    user_ids: Tensor  # [u] the client's users


def model_tensor(model: nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``name`` (a state-dict key) of ``model``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    parameters = dict(module.named_parameters(recurse=False))
    return parameters[leaf] if leaf in parameters else module.get_buffer(leaf)


def replace_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    """Swap the parameter or buffer ``name`` for ``value`` (of any number of rows); a parameter stays a
    parameter with the same ``requires_grad``, a buffer stays a (persistent: it is a state-dict entry) buffer.

    The one place the federated package changes a model's tensors rather than their values: a round makes
    resident exactly its clients' rows, so the model's per-user tables change their number of rows
    (see the module docstring). Done with ``register_parameter`` / ``register_buffer``, which replace an
    existing entry of that name.
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    parameters = dict(module.named_parameters(recurse=False))
    if leaf in parameters:
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=parameters[leaf].requires_grad))
    else:
        module.register_buffer(leaf, value)


class Residents:
    """The users whose rows are in the model right now, and the map from their user ids to those rows."""

    def __init__(self, user_ids: Tensor) -> None:
        self.user_ids = user_ids  # [n] resident row r holds user user_ids[r]
        self._sorted, self._order = user_ids.sort()  # [n], [n]

    def rows(self, user_ids: Tensor) -> Tensor:
        """Resident rows [B] of ``user_ids`` [B] (every one must be resident: the caller's own users)."""
        return self._order[torch.searchsorted(self._sorted, user_ids)]

    def __len__(self) -> int:
        return len(self.user_ids)


class ClientStateStore:
    """Private per-user state keyed by client id; see the module docstring."""

    def __init__(self, model: nn.Module, clients: Sequence[Client]) -> None:
        self.users = {client.client_id: client.user_ids for client in clients}  # client id -> [u] its users
        self.names: tuple[str, ...] = tuple(model.per_user_state)
        self.num_users = model_tensor(model, self.names[0]).size(0) if self.names else 0
        # a new client's starting rows: a table whose rows all start equal (an empty memory) is kept as one row
        self.initial: dict[str, Tensor] = {}
        for name in self.names:
            table = model_tensor(model, name).detach()  # [U, ...]
            constant = bool((table == table[:1]).all())
            self.initial[name] = (table[:1] if constant else table).clone()  # [1 or U, ...]
        self.states: dict[int, dict[str, Tensor]] = {}  # client id -> name -> [u, ...] rows of its users

    def _initial_rows(self, name: str, user_ids: Tensor) -> Tensor:
        table = self.initial[name]
        if len(table) == 1:
            return table.expand(len(user_ids), *table.shape[1:]).clone()
        return table[user_ids.to(table.device)].clone()

    def client_state(self, client: Client) -> dict[str, Tensor]:
        """The client's private rows (name -> [u, ...]), its initial ones if it never trained (not a copy)."""
        state = self.states.get(client.client_id)
        if state is None:
            state = {name: self._initial_rows(name, client.user_ids) for name in self.names}
        return state

    def load(self, model: nn.Module, clients: Sequence[Client]) -> Residents:
        """Make exactly ``clients``' users resident in ``model`` (their private rows, in client order)."""
        states = [self.client_state(client) for client in clients]
        for name in self.names:
            device = model_tensor(model, name).device
            replace_tensor(model, name, torch.cat([state[name] for state in states]).to(device))  # [n, ...]
        return Residents(torch.cat([client.user_ids for client in clients]))

    def shared_state(self, model: nn.Module) -> dict[str, Tensor]:
        """``model``'s state without the private per-user tables: the shared parameters and buffers (e.g. the
        global prototypes), what the server holds."""
        private = set(self.names)
        return {name: value for name, value in model.state_dict().items() if name not in private}

    def release(self, model: nn.Module) -> None:
        """Leave no user's rows in ``model`` (zero-row per-user tables): between rounds the server's model
        holds shared state only."""
        for name in self.names:
            empty = self.initial[name][:0].to(model_tensor(model, name).device)  # [0, ...]
            replace_tensor(model, name, empty)

    def save(self, model: nn.Module, clients: Sequence[Client]) -> None:
        """Take the resident rows of ``clients`` (loaded by :meth:`load`, same order) back into the store."""
        start = 0
        for client in clients:
            stop = start + len(client.user_ids)
            self.states[client.client_id] = {
                name: model_tensor(model, name).detach()[start:stop].clone() for name in self.names
            }
            start = stop

    def assemble(self, model: nn.Module) -> None:
        """Every user's private rows into ``model`` as full ``[num_users, ...]`` tables (for evaluation)."""
        trained = list(self.states)
        for name in self.names:
            initial = self.initial[name]
            table = initial.expand(self.num_users, *initial.shape[1:]).clone()  # [U, ...]
            if trained:
                users = torch.cat([self.users[client_id] for client_id in trained]).to(table.device)  # [n]
                table[users] = torch.cat([self.states[client_id][name] for client_id in trained]).to(table)
            replace_tensor(model, name, table.to(model_tensor(model, name).device))

    def state_dict(self) -> dict:
        return {"names": self.names, "states": self.states}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["names"]) != self.names:
            raise CheckpointError(f"client states of {state['names']} cannot restore a store of {self.names}")
        self.states = dict(state["states"])
