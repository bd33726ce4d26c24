"""The user-level DP budget of a federated run before it is trained: epsilon after a number of rounds for a few
noise multipliers, and the noise multiplier a target epsilon allows, from the accountant the training uses.

    python -m recbole_feddmmr.experiments.privacy_budget --users 943 --clients_per_round 16 \\
        --noise_multipliers 0.5 1 2 4 --rounds 100 500 1000 2000 --target_epsilons 1 4 8 \\
        --out results/privacy_budget_ml-100k.json

The rounds are accounted exactly as :class:`recbole_feddmmr.federated.privacy.PrivacyAccountant` accounts a
run (dp-accounting's RDP accountant; ``--sampling fixed``: a fixed cohort, analysed under the replace-one
relation; ``poisson``: each user joins a round with probability cohort / users). ``--delta`` defaults to
1 / users, as ``dp_delta`` does. No model is trained: this says how much noise a budget costs, which
is what the accuracy of a private run then depends on.
"""

from __future__ import annotations

import sys
from typing import Any

from recbole_feddmmr.errors import ConfigError, run_cli
from recbole_feddmmr.experiments.runner import begin_command, new_report, provenance, write_json
from recbole_feddmmr.experiments.tables import format_budget
from recbole_feddmmr.federated.privacy import PrivacyAccountant, PrivacySettings, calibrate_noise_multiplier

MODULE = "recbole_feddmmr.experiments.privacy_budget"


def budget_table(
    users: int,
    cohort: int,
    sampling: str,
    delta: float,
    noise_multipliers: list[float],
    rounds: list[int],
    target_epsilons: list[float],
) -> dict[str, Any]:
    """Epsilon at ``delta`` for every (noise multiplier, rounds), and the calibrated multiplier of every
    (target epsilon, rounds)."""
    if not 0 < cohort <= users:
        raise ConfigError(f"--clients_per_round must be in 1..{users} (the users), got {cohort}")
    epsilons = []
    for noise in noise_multipliers:
        accountant = PrivacyAccountant(PrivacySettings(1.0, noise, delta, sampling), users, cohort)
        epsilons.append({"noise_multiplier": noise, "epsilon": [accountant.epsilon(count) for count in rounds]})
    calibrated = [
        {
            "target_epsilon": target,
            "noise_multiplier": [
                calibrate_noise_multiplier(target, delta, count, users, cohort, sampling) for count in rounds
            ],
        }
        for target in target_epsilons
    ]
    return {
        "users": users,
        "clients_per_round": cohort,
        "sampling": sampling,
        "delta": delta,
        "rounds": rounds,
        "epsilon": epsilons,
        "calibrated": calibrated,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, argv = begin_command(MODULE, __doc__, argv)
    parser.add_argument("--users", type=int, default=943, help="clients (one user each); ml-100k has 943")
    parser.add_argument("--clients_per_round", type=int, default=16)
    parser.add_argument("--sampling", choices=("fixed", "poisson"), default="fixed")
    parser.add_argument("--delta", type=float, default=None, help="default: 1 / users")
    parser.add_argument("--noise_multipliers", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--rounds", nargs="+", type=int, default=[100, 500, 1000, 2000])
    parser.add_argument("--target_epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--out", default=None, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    if args.users < 2:
        parser.error("--users must be at least 2")
    delta = args.delta if args.delta is not None else 1.0 / args.users
    budget = budget_table(
        args.users,
        args.clients_per_round,
        args.sampling,
        delta,
        args.noise_multipliers,
        args.rounds,
        args.target_epsilons,
    )
    report = new_report("privacy-budget", MODULE, argv, budget=budget)
    print(format_budget(budget) + provenance(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if run_cli(main) else 1)
