"""The commit a figure records: -dirty for changed code, not for rewritten results tables."""

from __future__ import annotations

import subprocess

from recbole_feddmmr import provenance


def test_commit_is_dirty_for_changed_code_but_not_for_rewritten_results(tmp_path, monkeypatch):
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    package = tmp_path / "recbole_feddmmr"
    package.mkdir()
    (package / "model.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("| a |\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    head = git("rev-parse", "--short", "HEAD").strip()
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)

    (tmp_path / "results" / "table.md").write_text("| b |\n")  # a benchmark rewrote its table
    (tmp_path / "results" / "new.json").write_text("{}")  # and wrote a new cell
    assert provenance.git_commit() == head
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("figures\n")
    git("add", "docs")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "docs")
    head = git("rev-parse", "--short", "HEAD").strip()
    (tmp_path / "docs" / "results.md").write_text("new figures\n")  # prose is not code
    assert provenance.git_commit() == head
    (package / "model.py").write_text("x = 2\n")  # the code changed
    assert provenance.git_commit() == f"{head}-dirty"


def test_commit_is_dirty_for_changed_defaults_outside_the_package(tmp_path, monkeypatch):
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    package = tmp_path / "recbole_feddmmr"
    package.mkdir()
    (package / "model.py").write_text("x = 1\n")
    (tmp_path / "properties").mkdir()
    (tmp_path / "properties" / "model.yaml").write_text("dropout: 0.3\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    head = git("rev-parse", "--short", "HEAD").strip()
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    assert provenance.git_commit() == head
    (tmp_path / "properties" / "model.yaml").write_text("dropout: 0.5\n")  # a default changed: not the same run
    assert provenance.git_commit() == f"{head}-dirty"
