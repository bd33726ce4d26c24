"""A run's fingerprint: a hash of every configuration entry that changes what the run computes.

Checkpoints and resume files carry it, so a run never evaluates or resumes another run's file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# settings that do not change what a run computes (where it writes, how it shows progress, which device and
# how fast it evaluates); every other config entry is part of a run's fingerprint. The federated backend is
# part of it: its dropout masks differ.
NOT_IN_FINGERPRINT = frozenset(
    {
        "show_progress", "state", "checkpoint_dir", "eval_batch_size",
        "vectorized_chunk_targets", "device", "gpu_id", "use_gpu", "local_rank", "nproc", "world_size", "offset",
        "ip", "port", "worker", "log_wandb", "wandb_project", "eval_user_chunk", "ray_address",
    }
)  # fmt: skip


def config_fingerprint(config: Any) -> str:
    """A hash of every config entry that defines the run (the same command gives the same fingerprint);
    ``config``: a RecBole Config (anything with ``final_config_dict``)."""
    settings = {key: value for key, value in config.final_config_dict.items() if key not in NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
