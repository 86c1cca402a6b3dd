"""Every ```python block of the documentation runs, in a workspace that holds what a finished
`dvc repro` leaves (tests/docs/conftest.py). A block that cannot run there is marked on the line
before its fence with ``<!-- snippet: not run, <reason> -->``; it must still be valid Python.
"""

from __future__ import annotations

import ast

import pytest

from tests.docs.markdown import CHECKED_PAGES, USER_PAGES, Block, split_page

BLOCKS: list[Block] = [b for page in CHECKED_PAGES for b in split_page(page)[0] if b.language == "python"]


def test_most_snippets_run():
    user = [b for b in BLOCKS if b.page in USER_PAGES]
    assert len(user) >= 5
    assert sum(b.not_run_reason is None for b in user) >= 0.8 * len(user), "most user-page snippets must run"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_snippet(block, docs_workspace, monkeypatch, capsys):
    tree = ast.parse(block.code, filename=block.where)  # every snippet is valid Python
    if block.not_run_reason is not None:
        return
    monkeypatch.chdir(docs_workspace)
    exec(compile(tree, block.where, "exec"), {"__name__": "__doc_snippet__"})  # noqa: S102
    assert capsys.readouterr().out.strip(), f"{block.where} prints nothing: a snippet shows its result"
