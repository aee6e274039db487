"""README is the front page, CONTRIBUTING.md the developer's, and docs/ holds a page per task: every relative link and
image in them resolves to a file of the repository (an #anchor to a heading of its target, slugged as GitHub does),
and every docs page is reachable from README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


def outside_code(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks: what GitHub renders as prose, headings and links."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """A page's heading anchors; GitHub numbers a repeated one: x, x-1, x-2."""
    found, counts = set(), {}
    for line in outside_code(page) if page.suffix == ".md" else []:
        if m := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line):
            base = slug(m.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return found


def links(page: Path) -> list[str]:
    """Every link and image target on the page, inline code left out."""
    prose = [re.sub(r"`[^`]*`", "", line) for line in outside_code(page)]
    return [m.group(1) for line in prose for m in [*LINK.finditer(line), REFERENCE.match(line)] if m]


def test_there_are_pages_and_links_to_check():
    assert len(PAGES) > 1 and links(ROOT / "README.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: leave the repository
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert not [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")) if p not in linked]


def test_slugs_follow_github():
    assert slug("Is it learning? The online probe") == "is-it-learning-the-online-probe"
    assert slug("Several nodes: SLURM through submitit") == "several-nodes-slurm-through-submitit"
    assert slug("What `--data` reads") == "what---data-reads"
