"""Reading the repository's Markdown documentation: which files, their code blocks, inline code
and links. Shared by the tests under tests/docs/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The pages a user reads: the README and everything under docs/.
USER_PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
# Every page whose claims about the code are checked (contributors' pages too).
CHECKED_PAGES = sorted({*USER_PAGES, REPO / "ARCHITECTURE.md", REPO / "CHANGELOG.md"})

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A snippet the snippet test does not run is marked on the line right before its fence:
#   <!-- snippet: not run, <the reason> -->
NOT_RUN = re.compile(r"<!--\s*snippet:\s*not run,\s*(.+?)\s*-->")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def split_page(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced code blocks of a page, and its prose lines (line number, text) outside them."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        start, language, body = i, fence.group(2), []
        i += 1
        while i < len(lines) and not _FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        marker = NOT_RUN.search(lines[start - 1]) if start > 0 else None
        blocks.append(Block(page, start + 1, language, "\n".join(body) + "\n",
                            marker.group(1) if marker else None))
    return blocks, prose


def inline_code(page: Path) -> list[tuple[int, str]]:
    """Every inline code span of the page's prose (tables included), with its line number."""
    _, prose = split_page(page)
    return [(n, m.group(1).strip()) for n, text in prose for m in _INLINE.finditer(text)]


def links(page: Path) -> list[tuple[int, str]]:
    """Every Markdown link target of the page's prose."""
    _, prose = split_page(page)
    return [(n, m.group(1)) for n, text in prose for m in _LINK.finditer(text)]


def shell_lines(page: Path) -> list[tuple[str, str]]:
    """Logical command lines (continuations joined) of the page's bash/shell blocks and of its
    inline code spans, each with where it is."""
    out: list[tuple[str, str]] = []
    blocks, _ = split_page(page)
    for block in blocks:
        if block.language not in ("bash", "sh", "shell", "console"):
            continue
        joined = block.code.replace("\\\n", " ")
        out += [(block.where, line) for line in joined.splitlines() if line.strip()]
    out += [(f"{rel(page)}:{n}", code) for n, code in inline_code(page)]
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = split_page(page)
    return {slug(text.lstrip("#")) for _, text in prose if re.match(r"^#{1,6} ", text)}
