"""What a result was made from: the code a stage runs, and the inputs that name a run.

A training run or sweep is identified by everything that determines its result (docs/explanation/runs.md):
the params that can change it, the prepared data's content hash, and a fingerprint of the code
the stage runs. :class:`RunInputs` holds the three and derives the run name from them, so
rerunning after an interruption finds the same name (Ray resumes it), and any change gives a new
name (a fresh run). Each run's inputs are recorded beside the runs in Ray's storage
(``<storage>/uml-run-inputs/<name>.json``), so that a fresh run can say what changed since the
last one.

The code fingerprint covers the source files of this repository (``uml/`` and ``pipeline/``)
that ``python -m pipeline.<stage>`` imports, found statically with :mod:`modulefinder`:
function-level and lazy imports count too, so the list is a superset of what one run happens to
import. Third-party packages are pinned by the environment, not fingerprinted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import modulefinder
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs

from uml.config import Params

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Top-level packages of this repository whose source is fingerprinted.
OWN_PACKAGES = ("uml", "pipeline")
RECORDS_DIR = "uml-run-inputs"
# At most this many items of each kind are named in a "what changed" message.
_SHOWN = 6


class _OwnModuleFinder(modulefinder.ModuleFinder):
    """Follows imports of this repository's packages only: scanning torch or ray as well would
    take minutes and add nothing (the environment pins them)."""

    def find_module(self, name: str, path: Any, parent: Any = None) -> Any:
        # A top-level lookup has neither a parent nor a package path to search in.
        if parent is None and path is None and name not in OWN_PACKAGES:
            raise ImportError(name)
        return super().find_module(name, path, parent)


@functools.cache
def stage_sources(stage: str) -> tuple[str, ...]:
    """Repository-relative POSIX paths of the ``uml``/``pipeline`` source files that
    ``python -m pipeline.<stage>`` can import, sorted."""
    if not (REPO_ROOT / "pipeline" / f"{stage}.py").is_file():
        raise ValueError(f"no stage module pipeline/{stage}.py")
    finder = _OwnModuleFinder(path=[str(REPO_ROOT)])
    finder.import_hook(f"pipeline.{stage}")
    files = set()
    for module in finder.modules.values():
        source = Path(module.__file__).resolve() if module.__file__ else None
        if source is not None and source.suffix == ".py" and source.is_relative_to(REPO_ROOT):
            files.add(source.relative_to(REPO_ROOT).as_posix())
    return tuple(sorted(files))


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def code_files(stage: str) -> dict[str, str]:
    """sha256 of each source file of ``stage`` (see :func:`stage_sources`), by relative path.

    Read afresh on every call (a few milliseconds), so an edit made in a long-lived process is
    seen."""
    return {rel: _file_sha256(REPO_ROOT / rel) for rel in stage_sources(stage)}


def fingerprint(files: Mapping[str, str]) -> str:
    """One sha256 over (path, file hash) pairs."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel]}\n".encode())
    return digest.hexdigest()


def code_fingerprint(stage: str) -> str:
    """The fingerprint of the code ``python -m pipeline.<stage>`` runs."""
    return fingerprint(code_files(stage))


def flatten(nested: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"loss": {"cls_weight": 0.3}}`` -> ``{"loss.cls_weight": 0.3}`` (``sep`` joins the keys;
    ``prefix`` is put before each, separator included). An empty mapping is kept as a value."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + sep, sep))
        else:
            flat[dotted] = value
    return flat


def select_params(params: Params, keys: Iterable[str]) -> dict[str, Any]:
    """The flat values of ``keys`` (dotted; a section or sub-section stands for all its keys)."""
    raw = params.model_dump(mode="json")
    selected: dict[str, Any] = {}
    for dotted in keys:
        node: Any = raw
        for part in dotted.split("."):
            node = node[part]
        selected.update(flatten({dotted: node}))
    return selected


@dataclass(frozen=True)
class RunInputs:
    """Everything that determines the result of a ``stage`` run (``train`` or ``tune``)."""

    stage: str
    params: dict[str, Any]  # flat dotted key -> value
    data_hash: str
    code: dict[str, str] = field(repr=False)  # source path -> sha256

    @property
    def code_fingerprint(self) -> str:
        return fingerprint(self.code)

    @property
    def name(self) -> str:
        """``<stage>-<12 hex>``: the same inputs always give the same name."""
        blob = json.dumps({"params": self.params, "data": self.data_hash, "code": self.code_fingerprint},
                          sort_keys=True, default=str).encode()
        return f"{self.stage}-{hashlib.sha256(blob).hexdigest()[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "params": self.params, "data_hash": self.data_hash,
                "code_fingerprint": self.code_fingerprint, "code": self.code, "recorded_at": time.time()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "RunInputs":
        return cls(stage=raw["stage"], params=dict(raw["params"]), data_hash=raw["data_hash"], code=dict(raw["code"]))

    def changes_since(self, earlier: "RunInputs") -> list[str]:
        """What differs from ``earlier``, one phrase per kind (params, data, code)."""
        changes = []
        keys = sorted(set(self.params) | set(earlier.params))
        changed = [k for k in keys if self.params.get(k, "<unset>") != earlier.params.get(k, "<unset>")]
        if changed:
            shown = ", ".join(f"{k} {earlier.params.get(k, '<unset>')!r} -> {self.params.get(k, '<unset>')!r}"
                              for k in changed[:_SHOWN])
            changes.append(f"params ({shown}{_more(changed)})")
        if self.data_hash != earlier.data_hash:
            changes.append(f"data (content hash {earlier.data_hash[:12]} -> {self.data_hash[:12]})")
        files = sorted(set(self.code) | set(earlier.code))
        edited = [f for f in files if self.code.get(f) != earlier.code.get(f)]
        if edited:
            described = [f"{f}{'' if f in self.code and f in earlier.code else (' added' if f in self.code else ' removed')}"
                         for f in edited]
            changes.append(f"code ({', '.join(described[:_SHOWN])}{_more(edited)})")
        return changes


def _more(items: Sequence[Any]) -> str:
    return f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""


def _storage_fs(storage: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and base path of Ray's storage (a local path or a URI such as s3://...)."""
    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).expanduser().absolute())


def run_exists(storage: str, name: str) -> bool:
    """True when ``<storage>/<name>`` holds an earlier run of that name (Ray will resume it)."""
    fs, base = _storage_fs(storage)
    return fs.get_file_info(f"{base.rstrip('/')}/{name}").type == pyarrow.fs.FileType.Directory


def last_recorded(storage: str, stage: str, exclude: str | None = None) -> RunInputs | None:
    """The inputs of the most recently recorded ``stage`` run in ``storage`` (other than ``exclude``)."""
    fs, base = _storage_fs(storage)
    records_dir = f"{base.rstrip('/')}/{RECORDS_DIR}"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(records_dir, allow_not_found=True))
    latest: tuple[float, RunInputs] | None = None
    for info in infos:
        if info.type != pyarrow.fs.FileType.File or not info.base_name.startswith(f"{stage}-"):
            continue
        if exclude and info.base_name == f"{exclude}.json":
            continue
        try:
            with fs.open_input_stream(info.path) as stream:
                raw = json.loads(stream.read().decode())
            recorded = RunInputs.from_json(raw), float(raw.get("recorded_at", 0.0))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable record only loses the "what changed" message
        if latest is None or recorded[1] > latest[0]:
            latest = (recorded[1], recorded[0])
    return latest[1] if latest else None


def record(storage: str, inputs: RunInputs) -> None:
    """Write ``<storage>/uml-run-inputs/<name>.json`` (complete or not at all)."""
    fs, base = _storage_fs(storage)
    records_dir = f"{base.rstrip('/')}/{RECORDS_DIR}"
    fs.create_dir(records_dir, recursive=True)
    target, partial = f"{records_dir}/{inputs.name}.json", f"{records_dir}/.{inputs.name}.json.partial"
    with fs.open_output_stream(partial) as stream:
        stream.write(json.dumps(inputs.to_json(), indent=1, sort_keys=True).encode())
    fs.move(partial, target)


def announce(storage: str, inputs: RunInputs, resumes: bool, what: str = "run") -> str:
    """Log whether ``inputs`` resume an earlier run or start a fresh one, and why; record them.

    Returns the message logged."""
    if resumes:
        message = (f"{what} '{inputs.name}' continues the earlier {what} of the same params, data and code "
                   f"(code {inputs.code_fingerprint[:12]}); finished parts are kept")
    else:
        try:
            earlier = last_recorded(storage, inputs.stage, exclude=inputs.name)
        except OSError as exc:  # e.g. object storage without list rights: only the message is lost
            earlier = None
            log.warning("cannot read earlier run records in %s: %s", storage, exc)
        if earlier is None:
            reason = f"no earlier {inputs.stage} {what} is recorded in {storage}"
        else:
            changes = inputs.changes_since(earlier)
            reason = (f"the last one, '{earlier.name}', had other " + "; ".join(changes) if changes
                      else f"'{earlier.name}' had the same inputs but left nothing to resume")
        message = f"fresh {what} '{inputs.name}': {reason}"
    log.info(message)
    try:
        record(storage, inputs)
    except OSError as exc:  # the run itself does not depend on its record
        log.warning("cannot record the inputs of %s in %s: %s", inputs.name, storage, exc)
    return message


# ------------------------------------------------------------------------------ tuned values
def tuning_target(params: Params, data_hash: str) -> dict[str, Any]:
    """What tuned values are valid for: the model, the data, the search space and the code of the
    tune stage. ``best_params.yaml`` records it as ``tuned_for``; train compares it with its own."""
    return {"model": params.model.model_dump(mode="json"), "data_hash": data_hash,
            "search_space": params.tune.model_dump(mode="json")["search_space"], "code": code_fingerprint("tune")}


def tuning_mismatch(recorded: Any, current: Mapping[str, Any]) -> str | None:
    """Why tuned values recorded for ``recorded`` do not apply to ``current`` (None: they do)."""
    if not isinstance(recorded, Mapping):
        return "it records nothing about what it was tuned for (written by hand or by an older uml)"
    reasons = []
    if recorded.get("model") != current["model"]:
        was, now = flatten(recorded.get("model") or {}, "model."), flatten(current["model"], "model.")
        keys = sorted(k for k in set(was) | set(now) if was.get(k, "<unset>") != now.get(k, "<unset>"))
        shown = ", ".join(f"{k} {was.get(k, '<unset>')!r} (now {now.get(k, '<unset>')!r})" for k in keys[:_SHOWN])
        reasons.append(f"another model: {shown}{_more(keys)}")
    if recorded.get("data_hash") != current["data_hash"]:
        reasons.append(f"other data (content hash {str(recorded.get('data_hash'))[:12]}, now {current['data_hash'][:12]})")
    if recorded.get("search_space") != current["search_space"]:
        reasons.append(f"another tune.search_space ({recorded.get('search_space')}, now {current['search_space']})")
    if recorded.get("code") != current["code"]:
        reasons.append(f"other code (tune stage fingerprint {str(recorded.get('code'))[:12]}, now {current['code'][:12]})")
    return "it was tuned for " + "; ".join(reasons) if reasons else None
