"""User-level differential privacy for federated rounds (DP-FedAvg, McMahan et al., ICLR 2018).

* Each client clips its whole upload (every shared parameter's update, the item-table rows included) to
  L2 norm ``clip_norm`` before it leaves the client (:func:`clip_update`), and weighs 1 whatever its
  number of samples: one user's data moves the sum of a round by at most ``clip_norm``.
* The server adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` to every
  coordinate of the sum, the rows no client touched included (:func:`add_noise`), and divides by the
  expected number of clients of a round (a fixed denominator, so the count of clients that answered is not
  released either), then steps its optimizer on that.
* The accountant (:class:`PrivacyAccountant`) composes the rounds with Google's ``dp-accounting``
  library's Rényi-DP accountant: a Poisson-sampled Gaussian mechanism per round (``sampling: poisson``:
  each client joins a round independently with probability q; add-or-remove-one neighbours), or sampling
  without replacement (``fixed`` rounds of the same size; replace-one neighbours, see
  :func:`round_event`). Why that library: it is maintained, it implements the subsampled Gaussian's RDP
  bound that the DP-FedAvg analysis uses, and its calibration finds the noise multiplier for a target
  epsilon (:func:`calibrate_noise_multiplier`).

What the guarantee covers is stated in docs/federated.md ("Privacy"): it bounds what the shared update
reveals about one user's interactions. Row-wise aggregation divides a row by the number of clients that
changed it, so one client's influence on a rarely touched row is not bounded by ``clip_norm`` over the
cohort: it is refused under DP. Memory prototypes are a second release outside this budget: they are not
sent under DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import rdp
from torch import Tensor

from recbole_feddmmr.errors import ConfigError

SAMPLINGS = ("fixed", "poisson")


@dataclass(frozen=True)
class PrivacySettings:
    clip_norm: float
    noise_multiplier: float
    delta: float
    sampling: str  # fixed | poisson
    target_epsilon: float | None = None  # stop once spent (or calibrate the noise to it, see the trainer)

    def __post_init__(self) -> None:
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or not 0 < self.delta < 1:
            raise ConfigError(
                f"dp_clip_norm must be > 0, dp_noise_multiplier >= 0 and dp_delta in (0, 1), got "
                f"{self.clip_norm}, {self.noise_multiplier}, {self.delta}"
            )
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"client_sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")


def update_norm(update: dict[str, Tensor]) -> float:
    """The L2 norm of a whole upload: every tensor of ``update`` as one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: dict[str, Tensor], clip_norm: float) -> dict[str, Tensor]:
    """``update`` scaled by ``min(1, clip_norm / norm)``: its whole L2 norm is at most ``clip_norm``."""
    norm = update_norm(update)
    if norm <= clip_norm:
        return update
    factor = clip_norm / norm
    return {name: tensor * factor for name, tensor in update.items()}


def add_noise(totals: dict[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Gaussian noise of standard deviation ``std`` on every coordinate of every summed tensor."""
    noisy = {}
    for name, total in totals.items():
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64, device=generator.device)
        noisy[name] = total + std * noise.to(total.device)
    return noisy


def round_event(sampling_rate: float, noise_multiplier: float, population: int, cohort: int) -> dp_accounting.DpEvent:
    """One round's mechanism: the Gaussian mechanism on a cohort sampled with Poisson sampling (``cohort``
    0) or without replacement (a fixed ``cohort``). The latter is analysed under the replace-one relation
    (the only one dp-accounting supports for it), where one user's change moves the sum of clipped uploads
    by up to ``2 C``: its noise multiplier relative to that sensitivity is half the configured one."""
    if cohort <= 0:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        return gaussian if sampling_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        population, cohort, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )


def new_rdp_accountant(sampling: str) -> rdp.RdpAccountant:
    """dp-accounting's RDP accountant under the neighbouring relation of ``sampling`` (see :func:`round_event`)."""
    relation = dp_accounting.NeighboringRelation
    return rdp.RdpAccountant(
        neighboring_relation=relation.ADD_OR_REMOVE_ONE if sampling == "poisson" else relation.REPLACE_ONE
    )


class PrivacyAccountant:
    """Epsilon spent after a number of rounds, from dp-accounting's RDP accountant (composition as the
    library intends: one ``SelfComposedDpEvent`` of the rounds so far). Its state is the rounds, which the
    run's resume state carries."""

    def __init__(self, settings: PrivacySettings, population: int, cohort: int) -> None:
        self.settings, self.population, self.cohort = settings, population, cohort
        self.sampling_rate = min(1.0, cohort / population)
        self.rounds = 0

    def event(self, rounds: int) -> dp_accounting.DpEvent:
        per_round = round_event(
            self.sampling_rate,
            self.settings.noise_multiplier,
            self.population,
            0 if self.settings.sampling == "poisson" else self.cohort,
        )
        return dp_accounting.SelfComposedDpEvent(per_round, rounds)

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at ``dp_delta`` after ``rounds`` (default: the rounds accounted so far); inf without noise."""
        rounds = self.rounds if rounds is None else rounds
        if rounds == 0:
            return 0.0
        if self.settings.noise_multiplier == 0:
            return math.inf
        accountant = new_rdp_accountant(self.settings.sampling)
        accountant.compose(self.event(rounds))
        return float(accountant.get_epsilon(self.settings.delta))

    def step(self) -> float:
        """Account one more round -> epsilon so far."""
        self.rounds += 1
        return self.epsilon()

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, rounds: int, population: int, cohort: int, sampling: str
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon`` at ``delta``."""
    rate = min(1.0, cohort / population)

    def event(noise_multiplier: float) -> dp_accounting.DpEvent:
        one = round_event(rate, noise_multiplier, population, 0 if sampling == "poisson" else cohort)
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: new_rdp_accountant(sampling),
            event,
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(0.01, 1.0),
        )
    )
