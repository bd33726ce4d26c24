"""FederatedTrainer: rounds of FedMemServer instead of epochs; evaluation, early stopping and checkpoints are RecBole's.

Every ``eval_every`` rounds, and after the last round (the round cap, or the round that spends the time
budget), the global model (with each user's private memory and the global prototypes) is evaluated by
RecBole's evaluator on validation, so every run keeps a validated model to test; the best round is kept by
validation only. Before each evaluation the client state store assembles every user's private rows
into the model (see ``state.py``), so the evaluated model and its checkpoint hold them as a centralised
model does. Every ``resume_every_s`` seconds the whole simulation state (shared parameters, global
prototypes, the client state store, server optimizer moments, round, early-stopping state, RNG
states) is written to ``<checkpoint_dir>/<model>-<dataset>-federated-seed<seed>-<fingerprint>.resume.pth``;
the same command run again after a crash resumes from it (a file written under another
configuration is refused), and a finished run removes it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from recbole.utils import early_stopping, set_color
from tqdm import tqdm

from recbole_feddmmr.data import SequenceWindows
from recbole_feddmmr.errors import CheckpointError, ConfigError
from recbole_feddmmr.federated.attacks import AttackSettings, plan_attack
from recbole_feddmmr.federated.backends import make_backend
from recbole_feddmmr.federated.client import FedMemClient, shared_parameters
from recbole_feddmmr.federated.contracts import FederatedModel
from recbole_feddmmr.federated.partition import dominant_labels, partition_users
from recbole_feddmmr.federated.privacy import PrivacyAccountant, PrivacySettings, calibrate_noise_multiplier
from recbole_feddmmr.federated.server import Availability, FedMemServer, RoundReport
from recbole_feddmmr.federated.server_optimizer import ServerOptimizer
from recbole_feddmmr.federated.settings import FederatedSettings
from recbole_feddmmr.federated.strategy import FedMemStrategy
from recbole_feddmmr.resumable import save_atomically
from recbole_feddmmr.trainer import UR4RecV2MoETrainer


class FederatedTrainer(UR4RecV2MoETrainer):
    """Rounds of :class:`FedMemServer` over the clients instead of epochs (see the module docstring)."""

    def __init__(self, config, model) -> None:
        if not isinstance(model, FederatedModel):
            raise ConfigError(
                f"federated training needs a model with a window loss, per-user and per-item tables and a memory "
                f"clock (recbole_feddmmr.federated.contracts.FederatedModel), which {type(model).__name__} has "
                "not: use UR4RecV2MoE (a plain SASRec = UR4RecV2MoE with --feature_id_field=None)"
            )
        self.federated = FederatedSettings.from_config(config)  # checked before anything is built
        super().__init__(config, model)
        if self.lr_scheduler is not None:  # the centralised optimizer's schedule: rounds never step that optimizer
            self.logger.info("lr_plateau_factor is for centralised training: federated rounds keep their rates")
            self.lr_scheduler = None
        self.rounds = self.federated.rounds
        self.eval_every = self.federated.eval_every
        self.settings = self.federated.local
        self.round_reports: list[RoundReport] = []  # resume_file, run_fingerprint: ResumableFitMixin's
        self.accountant: PrivacyAccountant | None = None  # user-level DP's, set when the server is built
        self.attack = AttackSettings()  # which clients are malicious (attacks.py), set when the server is built
        self.attack_users = torch.zeros(0, dtype=torch.long)  # their users

    # --------------------------------------------------------------- the run
    def build_server(self, train_data, settings: FederatedSettings | None = None, backend=None) -> FedMemServer:
        """The simulation's server over ``train_data``'s users: clients, strategy and backend of ``settings``
        (default: this run's); ``backend``: an execution backend to use instead of the configured one (e.g. a
        benchmark timing several on one model)."""
        config = self.config
        windows = self.sequence_windows(train_data)
        users = windows.user_ids.unique().cpu().numpy()
        federated = settings or self.federated
        labels = None
        if federated.partition == "dirichlet":
            dataset = train_data._dataset
            field = federated.partition_label_field
            if dataset.item_feat is None or field not in dataset.item_feat:
                raise ConfigError(f"partition=dirichlet needs the item field '{field}' (partition_label_field) loaded")
            feat = dataset.inter_feat
            all_labels = dominant_labels(
                feat[dataset.uid_field].numpy(), feat[dataset.iid_field].numpy(), dataset.item_feat[field].numpy()
            )  # users in sorted order
            labels = all_labels[np.searchsorted(np.unique(feat[dataset.uid_field].numpy()), users)]
        parts = partition_users(
            users,
            federated.partition,
            federated.num_clients,
            config["seed"],
            user_labels=labels,
            dirichlet_alpha=federated.dirichlet_alpha,
        )
        user_groups = [torch.as_tensor(part, device=self.device) for part in parts]
        client_windows = windows.windows_of_groups(user_groups)
        clients = [
            FedMemClient(i, users, windows, window_index)
            for i, (users, window_index) in enumerate(zip(user_groups, client_windows, strict=True))
        ]
        privacy = self.privacy_settings(federated, len(clients))
        item_counts = torch.bincount(windows.targets[windows.target_mask].cpu(), minlength=self.model.n_items)
        attack = plan_attack(
            federated.attack, federated.attack_fraction, federated.attack_scale, federated.attack_num_targets,
            len(clients), item_counts, config["seed"],
        )  # fmt: skip
        self.attack = attack
        self.attack_users = torch.cat(
            [clients[i].user_ids.cpu() for i in sorted(attack.malicious)] or [torch.zeros(0, dtype=torch.long)]
        )
        local = dataclasses.replace(federated.local, attack=attack if attack.on else None)
        if settings is None:
            self.settings = local
        strategy = FedMemStrategy(
            num_prototypes=federated.local.num_prototypes,
            clients_per_round=federated.clients_per_round,
            client_fraction=federated.client_fraction,
            seed=config["seed"],
            aggregation=federated.aggregation,
            server_optimizer=ServerOptimizer(
                federated.server_optimizer,
                lr=federated.server_lr,
                momentum=federated.server_momentum,
                beta1=federated.server_beta1,
                beta2=federated.server_beta2,
                tau=federated.server_tau,
                bias_correction=federated.server_bias_correction,
            ),
            privacy=privacy,
            sampling=federated.client_sampling,
            robust=federated.robust,
        )
        return FedMemServer(
            self.model,
            clients,
            windows,
            strategy,
            local,
            backend=backend or self.build_backend(self.expected_round_steps(clients, windows, strategy)),
            availability=Availability(federated.client_dropout, federated.round_deadline_s, config["seed"]),
        )

    def privacy_settings(self, federated: FederatedSettings, population: int) -> PrivacySettings | None:
        """DP's settings for ``population`` clients (None without DP), with its accountant in ``self.accountant``:
        ``dp_delta`` defaults to 1 / population; without a noise multiplier, the one that spends
        ``dp_target_epsilon`` in ``rounds`` rounds."""
        self.accountant = None
        if not federated.private:
            return None
        cohort = min(federated.clients_per_round or max(1, round(federated.client_fraction * population)), population)
        delta = federated.dp_delta or 1.0 / population
        noise = federated.dp_noise_multiplier
        if noise is None:
            noise = calibrate_noise_multiplier(
                federated.dp_target_epsilon, delta, self.rounds, population, cohort, federated.client_sampling
            )
        privacy = PrivacySettings(
            federated.dp_clip_norm, noise, delta, federated.client_sampling, federated.dp_target_epsilon
        )
        self.accountant = PrivacyAccountant(privacy, population, cohort)
        self.logger.info(
            f"user-level DP: clip norm {privacy.clip_norm}, noise multiplier {noise:.4f}, delta {delta:.3g}, "
            f"{federated.client_sampling} sampling of {cohort} of {population} clients; epsilon after {self.rounds} "
            f"rounds {self.accountant.epsilon(self.rounds):.3f}; memory prototypes are not sent under DP"
        )
        return privacy

    def expected_round_steps(
        self, clients: list[FedMemClient], windows: SequenceWindows, strategy: FedMemStrategy
    ) -> float:
        """The local steps a round takes on average: the strategy's round size times a client's mean steps."""
        mean_steps = sum(client.steps_per_epoch(windows, self.settings) for client in clients) / max(1, len(clients))
        return strategy.round_size(len(clients)) * mean_steps * self.settings.local_epochs

    def build_backend(self, steps_per_round: float = 0.0):
        """The configured execution backend (``federated_backend``, see :func:`make_backend`)."""
        federated = self.federated
        # a robust rule reads every client's own upload: auto never picks Ray, which sums shards first
        name = "sequential" if federated.backend == "auto" and federated.robust.on else federated.backend
        return make_backend(
            name,
            self.device,
            steps_per_round=steps_per_round,
            chunk_targets=federated.vectorized_chunk_targets,
            ray_num_actors=federated.ray_num_actors,
            ray_cpus_per_actor=federated.ray_cpus_per_actor,
            ray_address=federated.ray_address,
        )

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
            f"federated: {len(server.clients)} clients ({self.federated.partition} partition), "
            f"{self.rounds} rounds, local epochs {self.settings.local_epochs}, backend {server.backend.name}"
        )
        rounds = range(self.start_epoch, self.rounds)
        iterator = tqdm(rounds, desc=set_color("Rounds", "pink"), ncols=100) if show_progress else rounds
        budget = self.federated.time_budget_s
        last_resume_save = self.elapsed_before_resume
        for round_idx in iterator:
            if self._privacy_spent(round_idx):
                break
            report = server.run_round(round_idx)
            if self.accountant is not None:
                report.epsilon = self.accountant.step()
            self.round_reports.append(report)
            self.train_loss_dict[round_idx] = report.mean_loss
            if verbose:
                self.logger.info(
                    set_color(f"round {round_idx}", "green")
                    + f" [clients: {report.clients}, mean local loss: {report.mean_loss:.4f}, "
                    f"up: {report.bytes_up / 1e6:.2f} MB, down: {report.bytes_down / 1e6:.2f} MB, "
                    f"time: {report.seconds:.2f}s, peak RSS: {report.peak_rss_mb:.0f} MB"
                    + (f", epsilon: {report.epsilon:.3f}]" if report.epsilon is not None else "]")
                )
            stop = False
            # every eval_every rounds and after the last one, so that every run keeps and tests a validated model
            if valid_data is not None and ((round_idx + 1) % self.eval_every == 0 or round_idx == self.rounds - 1):
                stop = self._validate_round(server, report, valid_data, saved, verbose, callback_fn)
            report.elapsed_seconds = self.fit_elapsed()
            if budget and report.elapsed_seconds >= budget and not stop:
                self.logger.info(f"time budget of {budget} s spent after round {round_idx}: stopping")
                if valid_data is not None and report.valid_score is None:  # the budget ends the run: its last
                    self._validate_round(server, report, valid_data, saved, verbose, callback_fn)  # round counts
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

    def _privacy_spent(self, round_idx: int) -> bool:
        """Whether the next round would spend more than ``dp_target_epsilon`` (then the run stops before it)."""
        accountant = self.accountant
        target = self.federated.dp_target_epsilon
        if accountant is None or target is None or accountant.epsilon(accountant.rounds + 1) <= target:
            return False
        self.logger.info(
            f"DP budget: round {round_idx} would spend epsilon {accountant.epsilon(accountant.rounds + 1):.3f} > "
            f"dp_target_epsilon {target}: stopping after {accountant.rounds} rounds"
        )
        return True

    def _validate_round(self, server: FedMemServer, report: RoundReport, valid_data, saved, verbose, callback_fn):
        """Validate the model after ``report``'s round, as RecBole validates an epoch -> early stopping's verdict."""
        round_idx = report.round_idx
        server.assemble_private_state()  # RecBole's evaluator reads every user's rows by user id
        valid_score, valid_result = self._valid_epoch(valid_data, show_progress=False)
        report.valid_score = float(valid_score)
        self.best_valid_score, self.cur_step, stop, improved = early_stopping(
            valid_score, self.best_valid_score, self.cur_step, self.stopping_step, self.valid_metric_bigger
        )
        if verbose:
            self.logger.info(set_color(f"round {round_idx} evaluating", "green") + f" [valid_score: {valid_score:.6f}]")
        if improved:
            self.best_valid_result = valid_result
            if saved:
                self._save_checkpoint(round_idx, verbose=verbose)
        if callback_fn:  # as RecBole's fit: e.g. a Ray Tune trial reporting each validation
            callback_fn(round_idx, valid_score)
        return stop

    # ------------------------------------------------------------ resumption
    def _save_resume_state(self, round_idx: int) -> None:
        state = self._progress_state(round_idx)  # best_epoch: the round of the best checkpoint
        state.update(
            server_optimizer=self.server.strategy.server_optimizer.state_dict(),  # momenta of FedAvgM/Adam/Yogi
            accountant=None if self.accountant is None else self.accountant.state_dict(),  # the rounds DP spent
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
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
        self._restore_progress_state(state)
        self.round_reports = state["round_reports"]
        self.logger.info(f"resuming the interrupted federated run from round {self.start_epoch} ({self.resume_file})")
