"""docs/reference/params.md is generated from the params schema (uml/config.py) by
``python -m uml.params_doc docs/reference/params.md``; these tests fail when it is stale."""

from __future__ import annotations

from tests.committed import committed_text
from tests.docs.markdown import REPO
from tests.docs.test_docs_match_code import schema_has
from uml import params_doc
from uml.config import Params

PAGE = REPO / "docs" / "reference" / "params.md"


def _leaves(model, prefix=""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from _leaves(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_the_committed_params_reference_is_current():
    # The comments of params.yaml as committed: a user's working copy (e.g. written by `uml params
    # FILE --out params.yaml`, without comments) must not fail this.
    assert PAGE.read_text() == params_doc.render(committed_text("params.yaml")), (
        f"{PAGE.relative_to(REPO)} is stale: regenerate it with `{params_doc.COMMAND}`")


def test_the_reference_lists_every_key_with_a_description():
    text = params_doc.render()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    keys = list(_leaves(Params))
    assert sorted(rows) == sorted(keys)
    undescribed = [key for key in keys if rows[key].rstrip().endswith("|  |")]
    assert not undescribed, (f"keys without a description: {undescribed}; comment them in uml/config.py (or beside "
                             "them in params.yaml)")


def test_the_generators_own_notes_name_existing_keys():
    assert all(schema_has(key) for key in params_doc.NOTES), [k for k in params_doc.NOTES if not schema_has(k)]


def test_comment_extraction():
    assert params_doc.params_yaml_comments("a:\n  b: 1   # the b\n  c:\n    d: 2 # deep\n") == {"a.b": "the b", "a.c.d": "deep"}
    comments = params_doc.schema_comments(type(Params().train))
    assert comments["constant_epochs"].startswith("Constant learning rate")
