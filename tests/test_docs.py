"""The documentation: the MkDocs site builds with --strict, the README stays a short front door, and
nothing in the project cites the outside specification document or its data folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# Text files the rule applies to (data files such as tokenizer vocabularies are not prose).
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".ini"}
# Built from pieces so that this file does not match its own patterns.
FORBIDDEN = {
    # the word as a citation; a Python name of that spelling (``X = …``, ``f(X, …)``) is not one
    "the outside specification document": re.compile(r"\b" + "SP" + r"EC\b(?!\s*[=,)])"),
    "the outside data folder": re.compile(re.escape("shared" + "/data")),
}


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
         "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    for page in ("index.html", "methods/index.html", "cli/index.html", "extending/index.html"):
        assert page in pages


def test_readme_is_short_and_keeps_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text


def _project_text_files():
    yield ROOT / "README.md"
    for folder in ("kpeft", "conf", "tests", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES:
                yield path


def test_no_citation_of_outside_documents():
    hits = []
    for path in _project_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: cites {what}: {line.strip()[:100]}")
    assert not hits, "cite papers (author, year, table, equation) or docs/<page>.md instead:\n" + "\n".join(hits)
