"""The server's step on a round's aggregated update (FedAvg, FedAvgM, FedAdam, FedYogi)."""

from __future__ import annotations

import torch
from torch import Tensor

from recbole_feddmmr.errors import CheckpointError, ConfigError

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


class ServerOptimizer:
    """The server's step on the aggregated client update (the pseudo-gradient ``delta``), after
    "Adaptive Federated Optimization" (Reddi et al., ICLR 2021, Algorithm 2):

    * ``fedavg``: ``x += lr * delta`` (``lr`` 1 is plain FedAvg);
    * ``fedavgm``: ``m = momentum * m + delta; x += lr * m``;
    * ``fedadam``: ``m = b1 * m + (1 - b1) * delta; v = b2 * v + (1 - b2) * delta^2; x += lr * m / (sqrt(v) + tau)``;
    * ``fedyogi``: as fedadam with ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)``.

    As in the paper, ``m`` starts at 0 and ``v`` at ``tau^2``. ``bias_correction`` (FedAdam and FedYogi)
    scales the step as Adam and Flower's FedAdam do, ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` at the server's t-th
    step, so that the first rounds' steps are not shrunk by the moments' zero start. Written out rather
    than borrowed from ``torch.optim`` because torch has no Yogi, and these lines are the algorithm the
    paper specifies. The state is per parameter and is part of the run's
    resume state (:meth:`state_dict`).
    """

    def __init__(
        self,
        name: str = "fedavg",
        lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.999,
        tau: float = 1e-3,
        bias_correction: bool = False,
    ) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ConfigError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}")
        if lr <= 0:
            raise ConfigError(f"server_lr must be > 0, got {lr}")
        self.name, self.lr, self.momentum, self.beta1, self.beta2, self.tau = name, lr, momentum, beta1, beta2, tau
        self.bias_correction = bias_correction
        self.steps = 0  # the server steps taken (the t of the bias correction)
        self.first_moment: dict[str, Tensor] = {}
        self.second_moment: dict[str, Tensor] = {}

    def step(self, params: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Tensor]:
        """New parameters from ``params`` and the pseudo-gradient ``delta`` (names without one are kept)."""
        new = dict(params)
        self.steps += 1
        lr = self.lr
        if self.bias_correction and self.name in ("fedadam", "fedyogi"):
            lr = self.lr * (1 - self.beta2**self.steps) ** 0.5 / (1 - self.beta1**self.steps)
        for name, update in delta.items():
            value = params[name]
            update = update.to(value.dtype)
            if self.name == "fedavg":
                new[name] = value + self.lr * update
                continue
            m = self.first_moment.get(name)
            if self.name == "fedavgm":
                m = update.clone() if m is None else self.momentum * m + update
                self.first_moment[name] = m
                new[name] = value + self.lr * m
                continue
            m = torch.zeros_like(update) if m is None else m
            v = self.second_moment.get(name, torch.full_like(update, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * update
            squared = update * update
            if self.name == "fedadam":
                v = self.beta2 * v + (1 - self.beta2) * squared
            else:  # fedyogi
                v = v - (1 - self.beta2) * squared * torch.sign(v - squared)
            self.first_moment[name], self.second_moment[name] = m, v
            new[name] = value + lr * m / (v.sqrt() + self.tau)
        return new

    def state_dict(self) -> dict:
        return {
            "name": self.name, "steps": self.steps,
            "first_moment": self.first_moment, "second_moment": self.second_moment,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise CheckpointError(f"server optimizer state of {state['name']!r} cannot resume {self.name!r}")
        self.first_moment, self.second_moment = dict(state["first_moment"]), dict(state["second_moment"])
        self.steps = state.get("steps", 0)  # resume files written before the count had none
