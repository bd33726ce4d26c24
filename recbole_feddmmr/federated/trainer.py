"""FederatedTrainer: rounds of FedMemServer instead of epochs; evaluation, early stopping and checkpoints are RecBole's.

Every ``eval_every`` rounds the global model (with each user's private memory and the global
prototypes) is evaluated by RecBole's evaluator on validation; the best round is kept by
validation only. Before each evaluation the client state store assembles every user's private rows
into the model (see ``state.py``), so the evaluated model and its checkpoint hold them as a centralised
model does. Every ``resume_every_s`` seconds the whole simulation state (shared parameters, global
prototypes, the client state store, server optimizer moments, round, early-stopping state, RNG
states) is written to ``<checkpoint_dir>/<model>-<dataset>-federated-seed<seed>-<fingerprint>.resume.pth``;
the same command run again after a crash resumes from it (a file written under another
configuration is refused), and a finished run removes it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from recbole.utils import early_stopping, set_color
from tqdm import tqdm

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.errors import CheckpointError, ConfigError
from recbole_feddmmr.federated.backends import SequentialBackend, VectorizedBackend, default_chunk_targets
from recbole_feddmmr.federated.client import FedMemClient, shared_parameters
from recbole_feddmmr.federated.partition import dominant_labels, partition_users
from recbole_feddmmr.federated.server import FedMemServer, RoundReport
from recbole_feddmmr.federated.strategy import FedMemStrategy, LocalSettings, ServerOptimizer
from recbole_feddmmr.resumable import save_atomically
from recbole_feddmmr.trainer import UR4RecV2MoETrainer
from recbole_feddmmr.utils import usable_cpus

# auto picks Ray from this many local steps per round: on the 2-core CPU a 16-client ml-100k round (~60
# steps) already ran faster over two actors than in one process (README, "Execution backends")
AUTO_RAY_MIN_STEPS = 32


def auto_backend(device: torch.device, cpus: int, steps_per_round: float, ray_installed: bool) -> str:
    """What ``federated_backend: auto`` runs.

    On a CPU with two or more cores, rounds of at least ``AUTO_RAY_MIN_STEPS`` local steps run on ``ray``
    (one single-threaded actor per core): a one-user client's step is a batch of ~30 targets, too small
    for torch's threads to share among cores, so separate processes use the cores and one process does
    not. Smaller rounds do not repay shipping the model's state to the actors, and stay ``sequential``.
    On CUDA: ``sequential``, until the vectorized path has passed ``scripts/gpu_check.sh`` on a GPU.
    """
    if device.type == "cpu" and cpus >= 2 and ray_installed and steps_per_round >= AUTO_RAY_MIN_STEPS:
        return "ray"
    return "sequential"


class FederatedTrainer(UR4RecV2MoETrainer):
    def __init__(self, config, model) -> None:
        super().__init__(config, model)
        self.rounds = config["rounds"]
        self.eval_every = config["eval_every"] or 1
        self.settings = LocalSettings(
            local_epochs=config["local_epochs"],
            local_batch_size=config["local_batch_size"] or config["train_batch_size"],
            local_lr=config["local_lr"] or config["learning_rate"],
            local_optimizer=config["local_optimizer"] or "adam",
            fedprox_mu=config["fedprox_mu"] or 0.0,
            num_prototypes=config["num_memory_prototypes"] if config["enable_prototype_aggregation"] else 0,
            # a missing setting keeps the safe default: a lower floor would let prototypes reveal single items
            prototype_min_entries=(
                LocalSettings.prototype_min_entries
                if config["prototype_min_entries"] is None
                else config["prototype_min_entries"]
            ),
            seed=config["seed"],
        )
        self.round_reports: list[RoundReport] = []  # resume_file, run_fingerprint: ResumableFitMixin's

    # --------------------------------------------------------------- the run
    def build_server(self, train_data) -> FedMemServer:
        config = self.config
        windows = self.sequence_windows(train_data)
        users = windows.user_ids.unique().cpu().numpy()
        labels = None
        if config["partition"] == "dirichlet":
            dataset = train_data._dataset
            field = config["partition_label_field"]
            if dataset.item_feat is None or field not in dataset.item_feat:
                raise ConfigError(f"partition=dirichlet needs the item field '{field}' (partition_label_field) loaded")
            feat = dataset.inter_feat
            all_labels = dominant_labels(
                feat[dataset.uid_field].numpy(), feat[dataset.iid_field].numpy(), dataset.item_feat[field].numpy()
            )  # users in sorted order
            labels = all_labels[np.searchsorted(np.unique(feat[dataset.uid_field].numpy()), users)]
        parts = partition_users(
            users,
            config["partition"],
            config["num_clients"],
            config["seed"],
            user_labels=labels,
            dirichlet_alpha=config["dirichlet_alpha"],
        )
        user_groups = [torch.as_tensor(part, device=self.device) for part in parts]
        client_windows = windows.windows_of_groups(user_groups)
        clients = [
            FedMemClient(i, users, windows, window_index)
            for i, (users, window_index) in enumerate(zip(user_groups, client_windows, strict=True))
        ]
        strategy = FedMemStrategy(
            num_prototypes=config["num_memory_prototypes"],
            clients_per_round=config["clients_per_round"],
            client_fraction=config["client_fraction"],
            seed=config["seed"],
            aggregation=config["aggregation"] or "mean",
            server_optimizer=ServerOptimizer(
                config["server_optimizer"] or "fedavg",
                lr=config["server_lr"] or 1.0,
                momentum=config["server_momentum"],
                beta1=config["server_beta1"],
                beta2=config["server_beta2"],
                tau=config["server_tau"],
            ),
        )
        return FedMemServer(
            self.model,
            clients,
            windows,
            strategy,
            self.settings,
            backend=self.build_backend(self.expected_round_steps(clients, windows, strategy)),
        )

    def expected_round_steps(
        self, clients: list[FedMemClient], windows: SequenceWindows, strategy: FedMemStrategy
    ) -> float:
        """The local steps a round takes on average: the strategy's round size times a client's mean steps."""
        mean_steps = sum(client.steps_per_epoch(windows, self.settings) for client in clients) / max(1, len(clients))
        return strategy.round_size(len(clients)) * mean_steps * self.settings.local_epochs

    def build_backend(self, steps_per_round: float = 0.0):
        """``federated_backend``; ``auto`` decides by :func:`auto_backend` from the device, the usable CPU
        cores and ``steps_per_round``, the local steps a round is expected to take (0: unknown, sequential)."""
        config = self.config
        name = config["federated_backend"] or "auto"
        cpus = usable_cpus()
        if name == "auto":
            name = auto_backend(self.device, cpus, steps_per_round, importlib.util.find_spec("ray") is not None)
        if name == "sequential":
            return SequentialBackend()
        if name == "vectorized":
            return VectorizedBackend(config["vectorized_chunk_targets"] or default_chunk_targets(self.device))
        if name == "ray":
            from recbole_feddmmr.federated.ray_backend import RayBackend

            actors = config["ray_num_actors"] or min(cpus, 8)
            return RayBackend(
                actors,
                cpus_per_actor=config["ray_cpus_per_actor"] or min(1.0, cpus / actors),
                address=config["ray_address"],
            )
        raise ConfigError(f"federated_backend must be auto, sequential, vectorized or ray, got {name!r}")

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        server = self.server = self.build_server(train_data)
        try:
            return self._fit(server, valid_data, verbose, saved, show_progress, callback_fn)
        finally:  # a process pool (Ray) ends with its run, also when the run fails
            if hasattr(server.backend, "shutdown"):
                server.backend.shutdown()

    def _fit(self, server: FedMemServer, valid_data, verbose, saved, show_progress, callback_fn):
        self._resume_if_interrupted(server)
        self._start_segment()
        self.logger.info(
            f"federated: {len(server.clients)} clients ({self.config['partition']} partition), "
            f"{self.rounds} rounds, local epochs {self.settings.local_epochs}, backend {server.backend.name}"
        )
        rounds = range(self.start_epoch, self.rounds)
        iterator = tqdm(rounds, desc=set_color("Rounds", "pink"), ncols=100) if show_progress else rounds
        budget = self.config["time_budget_s"]
        last_resume_save = self.elapsed_before_resume
        for round_idx in iterator:
            report = server.run_round(round_idx)
            self.round_reports.append(report)
            self.train_loss_dict[round_idx] = report.mean_loss
            if verbose:
                self.logger.info(
                    set_color(f"round {round_idx}", "green")
                    + f" [clients: {report.clients}, mean local loss: {report.mean_loss:.4f}, "
                    f"up: {report.bytes_up / 1e6:.2f} MB, down: {report.bytes_down / 1e6:.2f} MB, "
                    f"time: {report.seconds:.2f}s, peak RSS: {report.peak_rss_mb:.0f} MB]"
                )
            stop = False
            if valid_data is not None and (round_idx + 1) % self.eval_every == 0:
                server.assemble_private_state()  # RecBole's evaluator reads every user's rows by user id
                valid_score, valid_result = self._valid_epoch(valid_data, show_progress=False)
                report.valid_score = float(valid_score)
                self.best_valid_score, self.cur_step, stop, improved = early_stopping(
                    valid_score, self.best_valid_score, self.cur_step, self.stopping_step, self.valid_metric_bigger
                )
                if verbose:
                    self.logger.info(
                        set_color(f"round {round_idx} evaluating", "green") + f" [valid_score: {valid_score:.6f}]"
                    )
                if improved:
                    self.best_valid_result = valid_result
                    if saved:
                        self._save_checkpoint(round_idx, verbose=verbose)
                if callback_fn:  # as RecBole's fit: e.g. a Ray Tune trial reporting each validation
                    callback_fn(round_idx, valid_score)
            report.elapsed_seconds = self.fit_elapsed()
            if budget and report.elapsed_seconds >= budget and not stop:
                self.logger.info(f"time budget of {budget} s spent after round {round_idx}: stopping")
                stop = True
            # the resume state holds every user's memory, so its size grows with all users: written at most
            # every resume_every_s seconds (a crash loses at most that much), not after every cheap round
            if report.elapsed_seconds - last_resume_save >= (self.config["resume_every_s"] or 0):
                self._save_resume_state(round_idx)
                last_resume_save = report.elapsed_seconds
            if stop:
                break
        server.assemble_private_state()  # the trained model, as evaluation and analysis read it
        if valid_data is None and saved:
            self._save_checkpoint(self.rounds - 1, verbose=verbose)
        self.resume_file.unlink(missing_ok=True)  # finished: the same command starts afresh
        return self.best_valid_score, self.best_valid_result

    # ------------------------------------------------------------ resumption
    def _save_resume_state(self, round_idx: int) -> None:
        state = self._progress_state(round_idx)  # best_epoch: the round of the best checkpoint
        state.update(
            server_optimizer=self.server.strategy.server_optimizer.state_dict(),  # momenta of FedAvgM/Adam/Yogi
            round_reports=self.round_reports,
            # shared parameters and global prototypes; the users' private rows are in the client state store
            state_dict=self.server.store.shared_state(self.model),
            client_states=self.server.store.state_dict(),
        )
        save_atomically(state, self.resume_file)  # never a half-written resume file

    def _resume_if_interrupted(self, server: FedMemServer) -> None:
        state = self._read_resume_state("server_optimizer")
        if state is None:
            return
        missing, unexpected = self.model.load_state_dict(state["state_dict"], strict=False)
        if set(missing) != set(server.store.names) or unexpected:
            raise CheckpointError(f"{self.resume_file} does not fit this model: missing {missing}, extra {unexpected}")
        server.store.load_state_dict(state["client_states"])
        server.global_params = shared_parameters(self.model)
        server.strategy.server_optimizer.load_state_dict(state["server_optimizer"])
        self._restore_progress_state(state)
        self.round_reports = state["round_reports"]
        self.logger.info(f"resuming the interrupted federated run from round {self.start_epoch} ({self.resume_file})")
