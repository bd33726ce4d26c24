"""The federated mode's settings as one typed object, read from the configuration and checked once.

``properties/federated.yaml`` is the single source of their defaults: nothing here or in the messages
carries a default of its own, and a missing or invalid setting is a one-line :class:`ConfigError` before any
training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from recbole_feddmmr.config import properties_dir
from recbole_feddmmr.errors import ConfigError
from recbole_feddmmr.federated.aggregation import AGGREGATIONS
from recbole_feddmmr.federated.attacks import AttackSettings
from recbole_feddmmr.federated.messages import LOCAL_OPTIMIZERS, LocalSettings
from recbole_feddmmr.federated.partition import SCHEMES
from recbole_feddmmr.federated.robust import RobustSettings
from recbole_feddmmr.federated.server_optimizer import SERVER_OPTIMIZERS

BACKENDS = ("auto", "sequential", "vectorized", "ray")
# settings a federated run cannot honour: its clients' local steps are plain SGD/Adam steps in float32
FEDERATED_UNSUPPORTED = {
    "clip_grad_norm": "local steps do not clip gradients",
    "enable_amp": "local steps run in float32",
}


@dataclass(frozen=True)
class FederatedSettings:
    """Every setting of a federated run (see ``properties/federated.yaml`` for what each means)."""

    rounds: int
    eval_every: int
    time_budget_s: float | None
    partition: str
    num_clients: int | None
    dirichlet_alpha: float
    partition_label_field: str
    clients_per_round: int | None
    client_fraction: float
    local: LocalSettings
    server_optimizer: str
    server_lr: float
    server_momentum: float
    server_beta1: float
    server_beta2: float
    server_tau: float
    server_bias_correction: bool
    aggregation: str
    client_sampling: str
    dp_clip_norm: float | None
    dp_noise_multiplier: float | None
    dp_delta: float | None
    dp_target_epsilon: float | None
    robust: RobustSettings
    client_dropout: float
    round_deadline_s: float | None
    secure_aggregation: bool
    attack: str
    attack_fraction: float
    attack_scale: float
    attack_num_targets: int
    backend: str
    vectorized_chunk_targets: int | None
    ray_num_actors: int | None
    ray_cpus_per_actor: float | None
    ray_address: str | None

    @classmethod
    def from_config(cls, config: Any) -> FederatedSettings:
        """The settings of ``config`` (a RecBole Config, or any mapping of settings), checked."""
        values: Mapping[str, Any] = getattr(config, "final_config_dict", config)

        def get(key: str) -> Any:
            if key not in values:
                raise ConfigError(f"federated setting '{key}' is missing (properties/federated.yaml defines it)")
            return values[key]

        for key, reason in FEDERATED_UNSUPPORTED.items():
            if values.get(key):
                raise ConfigError(f"{key}={values[key]} is not supported with federated=True ({reason}): unset it")
        # memory prototypes are a release outside DP's budget, and their merge (k-means) is no sum: not sent
        # under DP, nor under secure aggregation
        prototypes = (
            bool(get("enable_prototype_aggregation")) and not get("dp_clip_norm") and not get("secure_aggregation")
        )
        if prototypes and values.get("memory_type") == "history":
            raise ConfigError(
                "memory_type=history has no memory to summarise into prototypes: "
                "set enable_prototype_aggregation=False (or memory_type=dynamic)"
            )
        if prototypes and (get("num_memory_prototypes") or 0) < 1:
            raise ConfigError(
                f"num_memory_prototypes={get('num_memory_prototypes')}: at least 1 prototype per client, "
                "or enable_prototype_aggregation=False"
            )
        local = LocalSettings(
            local_epochs=get("local_epochs"),
            # ~ in the yaml: the centralised run's batch size and learning rate
            local_batch_size=get("local_batch_size") or get("train_batch_size"),
            local_lr=get("local_lr") or get("learning_rate"),
            local_optimizer=get("local_optimizer"),
            fedprox_mu=get("fedprox_mu"),
            num_prototypes=get("num_memory_prototypes") if prototypes else 0,
            prototype_min_entries=get("prototype_min_entries"),
            seed=get("seed"),
            clip_norm=get("dp_clip_norm"),
            weight_decay=values.get("weight_decay") or 0.0,
            secure_aggregation=bool(get("secure_aggregation")),
            aggregation=get("aggregation"),
        )
        settings = cls(
            rounds=get("rounds"),
            eval_every=get("eval_every"),
            time_budget_s=get("time_budget_s"),
            partition=get("partition"),
            num_clients=get("num_clients"),
            dirichlet_alpha=get("dirichlet_alpha"),
            partition_label_field=get("partition_label_field"),
            clients_per_round=get("clients_per_round"),
            client_fraction=get("client_fraction"),
            local=local,
            server_optimizer=get("server_optimizer"),
            server_lr=get("server_lr"),
            server_momentum=get("server_momentum"),
            server_beta1=get("server_beta1"),
            server_beta2=get("server_beta2"),
            server_tau=get("server_tau"),
            server_bias_correction=bool(get("server_bias_correction")),
            aggregation=get("aggregation"),
            client_sampling=get("client_sampling"),
            dp_clip_norm=get("dp_clip_norm"),
            dp_noise_multiplier=get("dp_noise_multiplier"),
            dp_delta=get("dp_delta"),
            dp_target_epsilon=get("dp_target_epsilon"),
            robust=RobustSettings(
                get("robust_aggregation"),
                trim=get("robust_trim"),
                norm_bound=get("robust_norm_bound"),
                byzantine=get("robust_byzantine"),
                multi_krum=get("robust_multi_krum"),
            ),
            client_dropout=get("client_dropout"),
            secure_aggregation=bool(get("secure_aggregation")),
            round_deadline_s=get("round_deadline_s"),
            attack=get("attack"),
            attack_fraction=get("attack_fraction"),
            attack_scale=get("attack_scale"),
            attack_num_targets=get("attack_num_targets"),
            backend=get("federated_backend"),
            vectorized_chunk_targets=get("vectorized_chunk_targets"),
            ray_num_actors=get("ray_num_actors"),
            ray_cpus_per_actor=get("ray_cpus_per_actor"),
            ray_address=get("ray_address"),
        )
        settings.check()
        return settings

    @property
    def private(self) -> bool:
        return self.dp_clip_norm is not None

    def check(self) -> None:
        """One-line :class:`ConfigError` for the first value that cannot run."""
        choices = (
            ("partition", self.partition, SCHEMES),
            ("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS),
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("federated_backend", self.backend, BACKENDS),
            ("local_optimizer", self.local.local_optimizer, LOCAL_OPTIMIZERS),
        )
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        positive = (
            ("rounds", self.rounds),
            ("eval_every", self.eval_every),  # a run must validate, so that its best round is kept and tested
            ("local_epochs", self.local.local_epochs),
            ("local_batch_size", self.local.local_batch_size),
            ("local_lr", self.local.local_lr),
            ("server_lr", self.server_lr),
            ("server_tau", self.server_tau),
        )
        for key, value in positive:
            if value is None or value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value!r}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ConfigError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ConfigError(f"clients_per_round must be >= 1 (~: client_fraction), got {self.clients_per_round}")
        if self.partition != "user" and not self.num_clients:
            raise ConfigError(f"partition={self.partition} needs num_clients (the number of clients to form)")
        if self.client_sampling not in ("fixed", "poisson"):
            raise ConfigError(f"client_sampling must be fixed or poisson, got {self.client_sampling!r}")
        if self.dp_clip_norm is None and (self.dp_noise_multiplier or self.dp_target_epsilon):
            raise ConfigError("dp_noise_multiplier / dp_target_epsilon need dp_clip_norm: set the clipping norm")
        if self.dp_clip_norm is not None and self.dp_noise_multiplier is None and self.dp_target_epsilon is None:
            raise ConfigError("dp_clip_norm alone adds no noise: set dp_noise_multiplier or dp_target_epsilon")
        if self.robust.on and self.backend == "ray":
            raise ConfigError(
                f"robust_aggregation={self.robust.rule} needs each client's upload, and the ray backend sums shards "
                "of clients first: use federated_backend=sequential or vectorized"
            )
        AttackSettings(self.attack, self.attack_fraction, self.attack_scale)  # checks the attack's settings
        if self.robust.on and self.secure_aggregation:
            raise ConfigError(
                f"robust_aggregation={self.robust.rule} needs each client's upload, and under secure aggregation the "
                "server sees only their sum: choose one of the two"
            )
        if self.robust.on and self.private:
            raise ConfigError(
                "robust_aggregation and DP together are not supported: the noise goes on a sum of uploads"
            )
        if self.local.fedprox_mu < 0 or self.local.prototype_min_entries < 1:
            raise ConfigError("fedprox_mu must be >= 0 and prototype_min_entries >= 1")


def yaml_defaults() -> dict[str, Any]:
    """``properties/federated.yaml`` as a mapping (with the overall settings a federated run falls back on)."""
    settings: dict[str, Any] = {}
    for name in ("overall.yaml", "federated.yaml", "model/UR4RecV2MoE.yaml"):
        settings.update(yaml.safe_load((properties_dir() / name).read_text()) or {})
    return settings


def default_local_settings(**overrides: Any) -> LocalSettings:
    """The clients' settings of ``federated.yaml`` (e.g. for a script or a test), with ``overrides``."""
    return replace(FederatedSettings.from_config(yaml_defaults()).local, **overrides)
