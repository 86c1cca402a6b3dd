"""The repository's files as committed, for checks that must not read a user's working copy.

A DVC user changes ``params.yaml`` in the working tree (by hand, with ``dvc exp run -S`` or with
``uml params FILE --out params.yaml``); the tests that check the shipped defaults, and the
miniature DAG that starts from them, read the version in git's index instead: the committed file,
or the one staged for the next commit (``git add``), so that a developer who changes a default in
``uml/config.py`` and ``params.yaml`` together can test before committing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class NotACheckout(RuntimeError):
    """The repository is not a git checkout (or git is missing): there is no committed version."""


def committed_text(rel: str, repo: Path = REPO) -> str:
    """The content of ``rel`` (a path relative to ``repo``) in git's index: as committed, or as
    staged for the next commit. Raises :class:`NotACheckout` when ``repo`` is not a git checkout
    or git does not know the file."""
    if shutil.which("git") is None:
        raise NotACheckout(f"`git` is not on PATH: cannot read the committed {rel}")
    proc = subprocess.run(["git", "show", f":{rel}"], cwd=repo, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise NotACheckout(f"cannot read the committed {rel} of {repo} (`git show :{rel}` failed: "
                           f"{proc.stderr.decode(errors='replace').strip()}); the check needs a git checkout")
    return proc.stdout.decode()
