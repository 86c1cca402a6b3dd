"""docs/reference/metrics.md against what the evaluate stage writes: every key of a real
evaluation (the toy model of tests/toy_onnx.py, which has every output, on fundus masks) matches a
documented key pattern, and every documented pattern matches some key. A new metric fails the
first check until it is documented; a removed one fails the second."""

from __future__ import annotations

import re

from tests.docs.markdown import REPO

PAGE = REPO / "docs" / "reference" / "metrics.md"
PLACEHOLDERS = {
    "<s>": r"[A-Za-z0-9-]+",  # a structure: disc, cup, or a mask class name
    "<kind>": r"(?:gaussian|salt_pepper)",
    "<level>": r"[0-9.e-]+",
    "<pct>": r"[0-9.]+",
}


def documented_patterns() -> dict[str, re.Pattern]:
    """Documented key (as written) -> its regex. The first cell of each table row lists a key and
    optionally its suffixes (`_ci95_low`, `_ci95_high`), which name further keys."""
    patterns = {}
    for line in PAGE.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        base = None
        for token in re.findall(r"`([^`]+)`", first):
            key = base + token if token.startswith("_") and base else token
            base = key if not token.startswith("_") else base
            regex = re.escape(key)
            for placeholder, pattern in PLACEHOLDERS.items():
                regex = regex.replace(re.escape(placeholder), pattern)
            patterns[key] = re.compile(regex)
    return patterns


def test_the_page_documents_every_key_the_evaluation_writes(toy_evaluation):
    _, metrics = toy_evaluation
    patterns = documented_patterns()
    assert len(metrics) > 50 and len(patterns) > 25
    undocumented = sorted(key for key in metrics if not any(p.fullmatch(key) for p in patterns.values()))
    assert not undocumented, f"metrics.json keys missing from {PAGE.relative_to(REPO)}: {undocumented}"


def test_every_documented_key_is_written(toy_evaluation):
    _, metrics = toy_evaluation
    unused = sorted(name for name, p in documented_patterns().items() if not any(p.fullmatch(k) for k in metrics))
    assert not unused, f"{PAGE.relative_to(REPO)} documents keys the evaluation does not write: {unused}"
