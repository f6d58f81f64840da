"""The docs point only at what the repository holds.

Every relative markdown link in a tracked `*.md` file resolves (and its `#anchor`, when the
target is a markdown file, names a heading there); every file name a doc mentions that looks
like a repository path exists; and no tracked text file cites a document outside the
repository (the project's contracts live in docs/).
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a path a doc mentions may end in, to be checked.
EXTENSIONS = ("py", "md", "onnx", "json", "yaml", "yml", "proto", "txt", "png", "pt", "toml")
# Mentioned paths that are outputs of commands, not files of the repository.
OUTPUT_PREFIXES = ("runs/", "out/", "tmp/", "build/", ".venv/", "versions/")
# Citations of documents outside the repository (spelled in pieces so this file has none).
FORBIDDEN = ("DESIGN" + ".md", "docs/" + "DESIGN", "REFERENCES" + ".md", "../" + "shared")
TEXT_SUFFIXES = {".md", ".py", ".toml", ".proto", ".yaml", ".yml", ".txt", ".cfg", ".ini"}
TEXT_NAMES = {"Makefile", "run", "extras"}  # .ci/run, .ci/extras

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL = re.compile(r"[a-zA-Z][\w+.-]*://\S+")
PATH = re.compile(
    r"(?<![\w/.$~<-])((?:\.\.?/)*[\w.-]+(?:/[\w.-]+)*\.(?:" + "|".join(EXTENSIONS) + r"))"
    r"(?![\w/*{<-])"
)
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # RUN, STORAGE, NAME, ...
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


@cache
def tracked() -> tuple[Path, ...]:
    """The repository's files: tracked and new ones git does not ignore, or (no git, e.g. an
    unpacked archive) the tree without the ignored folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout.decode()
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "runs", "build", "out", "__pycache__", ".pytest_cache"}
        files = [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not skip & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.parts)
        ]
    return tuple(sorted(p for p in files if p.is_file()))


def markdown_files() -> list[Path]:
    return [p for p in tracked() if p.suffix == ".md"]


def rel(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: formatting and punctuation dropped, lower case, spaces
    to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return frozenset(found)


def link_problems(md: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        for target in LINK.findall(line):
            if URL.match(target) or target.startswith(("mailto:", "tel:")):
                continue
            path_part, _, anchor = target.partition("#")
            dest = md if not path_part else (md.parent / path_part).resolve()
            where = f"{rel(md, root)}:{n}: link {target!r}"
            if not dest.exists():
                problems.append(f"{where}: {path_part} does not exist")
            elif not dest.is_relative_to(root):
                problems.append(f"{where}: points outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: {dest.name} has no heading with anchor #{anchor}")
    return problems


def is_checked_path(token: str) -> bool:
    """A token worth checking: a path with a folder, or a markdown file's name; not a
    placeholder (RUN/agent.pt, P.onnx), not a command's output (runs/...), not absolute."""
    bare = token.lstrip("./")
    if token.startswith("/") or bare.startswith(OUTPUT_PREFIXES):
        return False
    parts = bare.split("/")
    if any(PLACEHOLDER.match(p) for p in parts[:-1]):
        return False
    stem, _, ext = parts[-1].rpartition(".")
    if ext != "md" and PLACEHOLDER.match(stem):
        return False
    return len(parts) > 1 or ext == "md"


def path_problems(md: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        line = URL.sub(" ", LINK.sub(" ", line))  # links are link_problems' job
        for token in PATH.findall(line):
            if not is_checked_path(token):
                continue
            if not any((base / token).exists() for base in (md.parent, root)):
                problems.append(
                    f"{rel(md, root)}:{n}: names {token}, which is not in the repository"
                )
    return problems


def test_the_repository_has_docs() -> None:
    names = {rel(p) for p in markdown_files()}
    assert {"README.md", "docs/contract.md", "docs/targets.md"} <= names


@pytest.mark.parametrize("md", markdown_files(), ids=rel)
def test_relative_links_resolve(md: Path) -> None:
    problems = link_problems(md)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("md", markdown_files(), ids=rel)
def test_named_files_exist(md: Path) -> None:
    problems = path_problems(md)
    assert not problems, "\n".join(problems)


def test_no_citation_outside_the_repository() -> None:
    problems = []
    for path in tracked():
        if path.suffix not in TEXT_SUFFIXES and path.name not in TEXT_NAMES:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            problems += [f"{rel(path)}:{n}: cites {f}" for f in FORBIDDEN if f in line]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("token", "checked"),
    [
        ("training/export.py", True),
        ("README.md", True),
        ("../docs/serving.md", True),
        ("RUN/agent.pt", False),
        ("runs/reach/policy.onnx", False),
        ("/srv/mu/policy.onnx", False),
        ("P.onnx", False),
        ("policy.onnx", False),
    ],
)
def test_which_tokens_are_paths(token: str, checked: bool) -> None:
    assert is_checked_path(token) is checked


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "training").mkdir(parents=True)
    (repo / "training" / "export.py").write_text("")
    (repo / "docs").mkdir()
    (repo / "docs" / "serving.md").write_text("# Serving\n\n## RPCs (`mu.v1`)\n")
    (tmp_path / "outside.md").write_text("")
    md = repo / "docs" / "probe.md"
    md.write_text(
        "[a](missing.md) [b](serving.md#no-such-heading) [c](serving.md#rpcs-muv1)\n"
        "`training/nope.py`, `training/export.py`, NOPE.md, [d](https://x.org/y.md)\n"
        "[e](../../outside.md) runs/x/policy.onnx `RUN/agent.pt`\n"
    )
    links, paths = link_problems(md, repo), path_problems(md, repo)
    assert len(links) == 3, links
    assert "missing.md" in links[0] and "#no-such-heading" in links[1] and "outside" in links[2]
    assert len(paths) == 2, paths
    assert "training/nope.py" in paths[0] and "NOPE.md" in paths[1]
