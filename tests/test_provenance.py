"""The commit a figure records: -dirty for changed code or defaults, not for rewritten results tables or docs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from recbole_feddmmr import provenance


def committed_checkout(root: Path, files: dict[str, str], monkeypatch) -> str:
    """A git checkout at ``root`` holding ``files`` (path -> text) and a package folder, all committed, that
    provenance reads as this project's -> its short HEAD."""
    for name, text in {"recbole_feddmmr/model.py": "x = 1\n", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    commit = ("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    for arguments in (("init", "-q"), ("add", "."), commit):
        subprocess.run(["git", *arguments], cwd=root, check=True, capture_output=True)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", root / "recbole_feddmmr")
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_commit_is_dirty_for_changed_code_but_not_for_rewritten_results_or_docs(tmp_path, monkeypatch):
    head = committed_checkout(tmp_path, {"results/table.md": "| a |\n", "docs/results.md": "figures\n"}, monkeypatch)
    (tmp_path / "results" / "table.md").write_text("| b |\n")  # a benchmark rewrote its table
    (tmp_path / "results" / "new.json").write_text("{}")  # and wrote a new cell
    (tmp_path / "docs" / "results.md").write_text("new figures\n")  # prose is not code
    assert provenance.git_commit() == head
    (tmp_path / "recbole_feddmmr" / "model.py").write_text("x = 2\n")  # the code changed
    assert provenance.git_commit() == f"{head}-dirty"


def test_commit_is_dirty_for_changed_defaults_outside_the_package(tmp_path, monkeypatch):
    head = committed_checkout(tmp_path, {"properties/model.yaml": "dropout: 0.3\n"}, monkeypatch)
    assert provenance.git_commit() == head
    (tmp_path / "properties" / "model.yaml").write_text("dropout: 0.5\n")  # a default changed: not the same run
    assert provenance.git_commit() == f"{head}-dirty"
