"""Where and with which code a process runs: the commit, the machine, its usable cores and peak memory.

Every results file and every resumed run's segment records these, so a figure names what produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS has one, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_description() -> str:
    """``<cpu model>, <n> torch threads, <GPU name or 'no GPU'>; torch <version>``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {device}; torch {torch.__version__}"


# the whole checkout but what is not code: results tables, docs and the README (git pathspecs, from the top)
CODE_PATHSPEC = (":(top)", ":(top,exclude)results", ":(top,exclude)docs", ":(top,exclude)README.md")


def git_commit() -> str:
    """The short commit of the checkout this package runs from, with ``-dirty`` when tracked files differ from
    it (a figure then came from uncommitted code); ``unknown`` for an installed copy outside a checkout.
    Every tracked file of the checkout counts (the package, its ``properties/`` defaults, the scripts), except
    what is not code: ``results/`` (a run rewrites the committed tables there), ``docs/`` and the README."""

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], capture_output=True, text=True, check=True, cwd=PACKAGE_DIR
        ).stdout.strip()

    try:
        # the checkout must be this project's: an installed copy can sit inside another repository (pyenv's)
        if Path(git("rev-parse", "--show-toplevel")).resolve() != PACKAGE_DIR.parent:
            return "unknown"
        commit, changes = (
            git("rev-parse", "--short", "HEAD"),
            git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHSPEC),
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if changes else commit


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is in KB on Linux, bytes on macOS); 0 where
    the ``resource`` module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)
