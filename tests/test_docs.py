"""Every shell command of README.md and docs/*.md runs, on the tiny dataset, and does what it promises.

The commands are read from the ```bash blocks of the pages, in order; a page's commands run one after
another in one workspace (a temporary folder holding a copy of the tiny dataset as
``dataset_atomic/tiny`` and of ``results/``), so a command may use what an earlier one of its page wrote.
A ```yaml block whose first line is ``# NAME.yaml`` is written there as that file first.

What changes from the page's text, through the settings the commands themselves take:

* any ``--dataset``/``-d`` becomes ``tiny`` (its own yaml sizes the models for it), ``--user 196`` a user of
  tiny, and a placeholder checkpoint (``saved/<...>.pth``) the newest checkpoint the page's commands wrote;
* each entry point's budget is bounded (epochs, rounds, seeds, trials, users; :data:`ENTRY_POINTS`);
* ``bash scripts/install.sh &&`` is dropped (CI's own first step is that install), and a command running
  this test suite is not run again from inside it.

A command the docs mark with a ``# doc-test: skip (reason)`` line above it (a multi-machine Ray cluster,
CLIP weights on disk) is listed as skipped with that reason. Commands of the slow entry points (the
experiments: many trainings each) run only with ``--slow`` (``python -m pytest -q tests --slow``); a command
that reads what a skipped one writes is skipped with it. A new command of a known entry point is covered
without editing this file; a new entry point runs with the generic substitutions and must exit with 0.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, TEST_DATA

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"#\s*doc-test:\s*skip\s*\((?P<reason>.*)\)\s*$")
OUTPUT_FLAGS = ("--out", "--storage", "--name")
PLACEHOLDER_CHECKPOINT = re.compile(r"^saved/.*<.*>.*\.pth$")


@dataclass(frozen=True)
class EntryPoint:
    """How a documented command of one entry point is bounded, and what it must show."""

    bounds: dict[str, str] = field(default_factory=dict)  # --flag -> value, replacing the page's or appended
    slow: bool = False
    promise: str | None = None  # a regex its output must match


ENTRY_POINTS: dict[str, EntryPoint] = {
    "run_recbole_feddmmr.py": EntryPoint(
        {"--epochs": "1", "--rounds": "2"}, promise=r"best epoch \d+ \(valid ndcg@10 .*\n(.|\n)*checkpoint: "
    ),
    "recbole-feddmmr": EntryPoint({"--epochs": "1", "--rounds": "2"}, promise=r"best epoch \d+"),
    "recbole_feddmmr.recommend": EntryPoint(promise=r"top \d+ for user"),
    "recbole_feddmmr.features": EntryPoint(promise=r"wrote .*tiny\.itememb"),
    "recbole_feddmmr.synthetic": EntryPoint(
        {"--num-users": "40", "--num-items": "200", "--num-factors": "4"}, slow=True, promise=r"planted"
    ),
    "recbole_feddmmr.experiments.report": EntryPoint(promise=r"command: `"),
    "recbole_feddmmr.experiments.benchmark": EntryPoint(
        {"--seeds": "1", "--epochs": "1", "--stopping_step": "1", "--rounds": "2"}, slow=True, promise=r"wrote "
    ),
    "recbole_feddmmr.experiments.tune": EntryPoint(
        {"--num_samples": "1", "--max_epochs": "1", "--num_cpus": "2"}, slow=True, promise=r"best (trial|configuration)"
    ),
    "recbole_feddmmr.experiments.federated_benchmark": EntryPoint(
        {"--rounds": "2", "--sasrec_epochs": "1", "--sampled_clients": "3", "--chunk_targets": "16"},
        slow=True,
        promise=r"\| run \||speed|seconds per round",
    ),
    "recbole_feddmmr.experiments.federated_study": EntryPoint(
        {"--rounds": "2", "--epochs": "1", "--eval_every": "1", "--time_budget": "120"}, slow=True, promise=r"\| run \|"
    ),
    "recbole_feddmmr.flower": EntryPoint({"--rounds": "2", "--eval_every": "1"}, slow=True, promise=r'"test_result"'),
    "recbole_feddmmr.experiments.flower_benchmark": EntryPoint(
        {"--rounds": "2", "--eval_every": "1"}, slow=True, promise=r"Flower / in-house seconds per round"
    ),
    "recbole_feddmmr.experiments.federated_scale": EntryPoint(
        {"--users": "30 60", "--rounds": "1", "--clients_per_round": "4"}, slow=True, promise=r"users \(clients\)"
    ),
}
GENERIC = EntryPoint()


@dataclass
class Command:
    page: Path
    index: int
    text: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.index}:{self.text[:60]}"


def yaml_files(text: str) -> dict[str, str]:
    """The ```yaml blocks of a page that name a file in their first line (``# NAME.yaml``)."""
    files = {}
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        first = block.splitlines()[0].strip()
        if re.fullmatch(r"#\s*[\w.-]+\.ya?ml", first):
            files[first.lstrip("#").strip()] = block
    return files


def page_commands(page: Path) -> list[Command]:
    """The shell commands of ``page``'s ```bash blocks (continuation lines joined), each with the skip reason
    the line above it gives, if any."""
    commands: list[Command] = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        reason = None
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line:
                continue
            mark = SKIP_MARK.match(line)
            if mark:
                reason = mark.group("reason")
                continue
            if line.startswith("#"):
                continue
            commands.append(Command(page, len(commands), line, reason))
            reason = None
    return commands


ALL_COMMANDS = [command for page in PAGES for command in page_commands(page)]


def test_the_docs_have_commands_and_every_skip_says_why():
    assert len(ALL_COMMANDS) >= 20
    assert {command.page.name for command in ALL_COMMANDS} >= {"README.md", "usage.md", "benchmark.md"}
    for command in ALL_COMMANDS:
        assert command.skip_reason is None or len(command.skip_reason) > 10, command.id


def entry_point(arguments: list[str]) -> str:
    """``python run_recbole_feddmmr.py ...`` -> ``run_recbole_feddmmr.py``; ``python -m M ...`` -> ``M``."""
    if arguments[:2] == ["python", "-m"]:
        return arguments[2]
    if arguments[0] == "python":
        return Path(arguments[1]).name
    return arguments[0]


def bounded(arguments: list[str], bounds: dict[str, str]) -> list[str]:
    """``arguments`` with each bound flag's value replaced (``--flag v``, ``--flag=v``, or a list after it) or
    the flag appended."""
    result = list(arguments)
    for flag, value in bounds.items():
        values = value.split()
        for index, token in enumerate(result):
            if token.startswith(flag + "="):
                result[index] = f"{flag}={value}"
                break
            if token == flag:
                end = index + 1
                while end < len(result) and not result[end].startswith("-"):
                    end += 1
                result[index + 1 : end] = values
                break
        else:
            result += [flag, *values]
    return result


def adapted(command: Command, workspace: Path) -> tuple[list[str] | None, str | None]:
    """The command as this test runs it in ``workspace`` -> (arguments, None), or (None, why it is not run)."""
    parts = [part.strip() for part in command.text.split("&&")]
    parts = [part for part in parts if not part.startswith("bash scripts/install.sh")]
    if not parts:
        return None, "installs the package: CI's own first step"
    if len(parts) > 1:
        raise AssertionError(f"{command.id}: one command per line, please")
    arguments = shlex.split(parts[0])
    if arguments[:3] == ["python", "-m", "pytest"]:
        return None, "runs this test suite"
    point = entry_point(arguments)
    for index, token in enumerate(arguments):  # the tiny dataset and its users stand in for any other
        if token in ("--dataset", "-d") and index + 1 < len(arguments):
            arguments[index + 1] = "tiny"
        elif token.startswith("--dataset="):
            arguments[index] = "--dataset=tiny"
        elif token == "--user" and index + 1 < len(arguments):
            arguments[index + 1] = "1"
        elif token == "--text-columns":
            end = index + 1
            while end < len(arguments) and not arguments[end].startswith("-"):
                end += 1
            arguments[index + 1 : end] = ["movie_title"]
        elif PLACEHOLDER_CHECKPOINT.match(token):
            written = sorted((workspace / "saved").glob("*.pth"), key=lambda path: path.stat().st_mtime)
            if not written:
                return None, "reads a checkpoint that no command of this page has written in this mode"
            arguments[index] = str(written[-1])
    if point == "recbole_feddmmr.features":
        if "--text-columns" not in arguments:
            arguments += ["--text-columns", "movie_title"]  # tiny has no built-in text recipe, as ml-100k has
        if "--overwrite" not in arguments:  # a dataset of the reader's own has no features yet
            (workspace / "dataset_atomic" / "tiny" / "tiny.itememb").unlink(missing_ok=True)
    arguments = bounded(arguments, ENTRY_POINTS.get(point, GENERIC).bounds)
    for index, token in enumerate(arguments):  # inputs an earlier command of the page writes
        earlier_output = index > 0 and arguments[index - 1] in OUTPUT_FLAGS
        if not earlier_output and "/" in token and re.search(r"\.(json|ya?ml|pth)$", token):
            if not (workspace / token).exists() and not Path(token).is_absolute():
                return None, f"reads {token}, written by a command of this page that did not run in this mode"
    if arguments[0] == "python":
        arguments[0] = sys.executable
    return arguments, None


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory) -> dict[Path, Path]:
    """One workspace per page: the tiny dataset as dataset_atomic/tiny, the committed results, and the page's
    named yaml files."""
    folders = {}
    for page in PAGES:
        folder = tmp_path_factory.mktemp(page.stem)
        shutil.copytree(TEST_DATA / "tiny", folder / "dataset_atomic" / "tiny")
        shutil.copytree(REPO / "results", folder / "results")
        for name, text in yaml_files(page.read_text()).items():
            (folder / name).write_text(text)
        folders[page] = folder
    return folders


def run_documented(command: Command, workspace: Path, slow: bool) -> None:
    if command.skip_reason:
        pytest.skip(f"the docs say: {command.skip_reason}")
    arguments, why_not = adapted(command, workspace)
    if arguments is None:
        pytest.skip(why_not)
    point = ENTRY_POINTS.get(entry_point(shlex.split(command.text.split("&&")[-1])), GENERIC)
    if point.slow and not slow:
        pytest.skip("an experiment of many trainings: run with --slow")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # the docs run from the repository root; the workspace stands in for it, the scripts stay in the checkout
    arguments = [str(REPO / token) if token in ("run_recbole_feddmmr.py",) else token for token in arguments]
    completed = subprocess.run(arguments, cwd=workspace, capture_output=True, text=True, timeout=900, env=env)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{' '.join(arguments)}\n{output[-4000:]}"
    assert "will not be used" not in output, "RecBole ignored arguments of the command: " + output[-2000:]
    if point.promise:
        assert re.search(point.promise, output), f"{command.text}: no {point.promise!r} in\n{output[-3000:]}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda command: command.id)
def test_a_documented_command_runs(command, workspaces, request):
    run_documented(command, workspaces[command.page], request.config.getoption("--slow"))
