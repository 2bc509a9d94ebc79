"""Every file the repo points a reader to exists: `docs/...` paths in any
tracked file, relative markdown links and their #anchors, and bare `name.md`
mentions. Paths written by a command (after `--out`) and the few file names
that commands produce at run time are outputs, not references. Nor may a file
send the reader to what the repo does not carry: the tracker's issue numbers
or "the brief"."""
from __future__ import annotations

import glob
import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `docs/...` from the repo root; not inside a URL or a longer path (`/docs/x`, `../shared/docs/x`)
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./*{},-]*")
OUTPUT_ARG = re.compile(r"--out[= ]$")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
BARE_MD = re.compile(r"(?<![\w/.{}<>*-])\w[\w.-]*\.md\b")
# written at run time: `statex-train eval`, the capacity report, scripts/profile_step.py
RUN_TIME_FILES = {"eval.md", "statex_capacity.md", "SHAPE-kernels.md"}
FENCE = re.compile(r"^\s*(```|~~~)")
ELSEWHERE = re.compile(r"\bissues? #?\d+\b|\bthe brief\b", re.IGNORECASE)
KEYS = ("docs/", ".md", "](", "ssue", "rief")           # a line without any of these holds no reference


def tracked_files(root: Path) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [root / p for p in out.decode().split("\0") if p]


def _expand_braces(path: str) -> list[str]:
    """`a/{b,c}.md` -> `a/b.md`, `a/c.md` (the shell's brace expansion, no nesting)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _exists(root: Path, path: str) -> bool:
    return all(glob.glob(str(root / p)) if "*" in p else (root / p).exists() for p in _expand_braces(path))


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a markdown file's headings (outside code fences)."""
    anchors, seen, fenced = set(), {}, False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _link_broken(root: Path, md_file: Path, target: str) -> bool:
    if re.match(r"[a-z][a-z+.-]*:", target):           # http:, https:, mailto:
        return False
    path, _, anchor = target.partition("#")
    dest = (md_file.parent / path).resolve() if path else md_file
    if not dest.exists() or root.resolve() not in (dest, *dest.parents):
        return True
    return bool(anchor) and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text())


def broken_references(root: Path, files: list[Path]) -> list[str]:
    """`file:line: reference` for each reference among ``files`` that does not resolve under ``root``."""
    names = {p.name for p in files} | RUN_TIME_FILES
    broken = []
    for f in files:
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue                                     # binary: weights, plots
        fenced = False
        for n, line in enumerate(text.splitlines(), 1):
            if f.suffix == ".md" and FENCE.match(line):
                fenced = not fenced
            if not any(k in line for k in KEYS):
                continue                                 # most lines; keeps the scan well under a second
            where = f"{f.relative_to(root)}:{n}"
            for m in DOCS_PATH.finditer(line):
                path = m.group().rstrip(".,")
                if not OUTPUT_ARG.search(line[:m.start()]) and not _exists(root, path):
                    broken.append(f"{where}: {path}")
            broken += [f"{where}: {m.group()}" for m in BARE_MD.finditer(line) if m.group() not in names]
            broken += [f"{where}: {m.group()}" for m in ELSEWHERE.finditer(line)]
            if f.suffix == ".md" and not fenced:
                broken += [f"{where}: {m.group(1)}" for m in MD_LINK.finditer(line)
                           if _link_broken(root, f, m.group(1))]
    return broken


def test_every_reference_in_the_repo_resolves():
    files = [f for f in tracked_files(ROOT) if f != Path(__file__).resolve()]   # this file's examples are broken on purpose
    assert broken_references(ROOT, files) == []


def test_the_check_finds_broken_references(tmp_path):
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Two words\n")
    (tmp_path / "docs" / "bench" / "a.png").write_bytes(b"\x89PNG\0")
    good = tmp_path / "good.md"
    good.write_text("See docs/guide.md, [it](docs/guide.md#two-words), ![plot](docs/bench/a.png),\n"
                    "docs/bench/*.png, docs/{guide,guide}.md, guide.md, [web](https://x.org/y.md),\n"
                    "`run --out docs/new/report.md`, a URL path /docs/swagger.js and eval.md.\n"
                    "```\n[not a link](nowhere.png)\n```\n")
    bad = tmp_path / "src.py"
    bad.write_text('"""See docs/missing.md and design.md."""\n# docs/bench/*.svg, docs/{guide,gone}.md\n'
                   "# as issue 6 asks; The brief's target\n")
    bad_md = tmp_path / "docs" / "bad.md"
    bad_md.write_text("![plot](prefix.png) [up](../good.md#nowhere) [out](../../etc/passwd)\n")
    files = [good, bad, bad_md, tmp_path / "docs" / "guide.md"]
    assert broken_references(tmp_path, files) == [
        "src.py:1: docs/missing.md", "src.py:1: design.md",
        "src.py:2: docs/bench/*.svg", "src.py:2: docs/{guide,gone}.md", "src.py:3: issue 6", "src.py:3: The brief",
        "docs/bad.md:1: prefix.png", "docs/bad.md:1: ../good.md#nowhere", "docs/bad.md:1: ../../etc/passwd"]
