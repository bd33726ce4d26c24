"""What the federated package needs of a model and of its memory, declared in one place.

Federation knows a model only through :class:`FederatedModel`: which of its state is private to users,
which shared tables are indexed by item, the window loss a client trains on, and the memory it may share
prototypes of (:class:`PrototypeMemory`). UR4RecV2MoE satisfies both; the model module knows nothing of
federation (structural typing: it never imports this file).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class PrototypeMemory(Protocol):
    """A private per-user memory whose contents a client may summarise (k-means prototypes) for the server."""

    def entry_features(self, user_ids: Tensor) -> Tensor:
        """The occupied entries of the users ``user_ids`` [u] as feature vectors [n, D]."""
        ...

    def set_global_prototypes(self, prototypes: Tensor) -> None:
        """The server's merged prototypes [g, D] become memory every user reads."""
        ...


@runtime_checkable
class FederatedModel(Protocol):
    """A model that federated training can run: its private state, its row tables, its window loss."""

    # state-dict names of the tensors with one row per user (dim 0 = user id): private, they never leave a
    # client; the trainable ones among them are ``per_user_parameters``
    per_user_state: tuple[str, ...]
    per_user_parameters: tuple[str, ...]
    # shared parameters with one row per item: a client sends only the rows its training changed
    per_item_parameters: tuple[str, ...]

    def calculate_window_loss(
        self,
        user_ids: Tensor,
        windows: Tensor,
        targets: Tensor,
        target_mask: Tensor,
        target_times: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Any:
        """A :class:`~recbole_feddmmr.model.losses.TrainingLoss` of whole sequence windows [B, L]."""
        ...

    def write_memory(self, writes: Any, step: int | None = None) -> int:
        """Make a training step's memory writes after its optimizer step -> how many were written."""
        ...

    def set_memory_clock(self, step: int) -> None:
        """Set the memory's training clock (a client's steps run at the round's clock)."""
        ...

    def prototype_memory(self) -> PrototypeMemory | None:
        """The memory clients summarise into prototypes, or ``None`` when the model has none."""
        ...


@runtime_checkable
class VectorizableModel(FederatedModel, Protocol):
    """A :class:`FederatedModel` whose window loss comes in two stages, so that ``torch.func.vmap`` can run
    the second (a pure function of the parameters) over many clients at once (the vectorized backend)."""

    writes_memory: bool

    def prediction_points(
        self,
        user_ids: Tensor,
        windows: Tensor,
        targets: Tensor,
        target_mask: Tensor,
        target_times: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Any:
        """The parameter-free inputs of the window loss (a :class:`~recbole_feddmmr.model.losses.PredictionPoints`)."""
        ...

    def points_loss(self, windows: Tensor, points: Any, *, all_items: bool = False) -> tuple:
        """(rec loss, weighted balance loss, surprise [P] or None) at ``points``."""
        ...
