"""The documentation against the code: every params key, command-line flag, repository file,
Python name and link that the README, docs/, ARCHITECTURE.md and CHANGELOG.md name exists; every
page under docs/ is reachable from the README; user pages carry no commit ids or before/now
history; the generated params reference is current.

Each check fails when the code loses what a page names (a params key removed from uml/config.py,
a flag from uml/cli.py or uml/stage.py, a file renamed), so the docs cannot silently go stale.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tests.docs.markdown import (CHECKED_PAGES, REPO, USER_PAGES, anchors, inline_code, links, rel, shell_lines,
                                 split_page)
from uml.config import Params, Paths, parse_params

SECTIONS = tuple(Params.model_fields)
_PARAM_KEY = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})(?:\.[a-z_][a-z0-9_]*)+)(?![\w(])")
_FILE_SUFFIX = re.compile(r"\.(pt|onnx|json|yaml|yml|csv|png|md|py|zarr|txt|cff|toml|pkl)$")
# Dotted names that start like a params section but are not params keys.
NOT_PARAMS = {"ray.init"}
TOP_LEVEL_FILES = {"README.md", "ARCHITECTURE.md", "CHANGELOG.md", "LICENSE", "CITATION.cff", "params.yaml",
                   "dvc.yaml", "pyproject.toml", "constraints.txt"}
REPO_DIRS = ("uml", "pipeline", "tests", "benchmarks", "configs", "docs", "data", ".ci")
_PATH = re.compile(rf"^(?:{'|'.join(re.escape(d) for d in REPO_DIRS)})/[\w./<>*-]*(?:::\w+)?$")
# Files a page tells the user to create (they are not in the repository).
USER_FILES = {"configs/cluster.yaml"}


# ----------------------------------------------------------------------------- params keys
def schema_has(dotted: str) -> bool:
    """Whether ``dotted`` is a section or key of the params schema (keys inside a mapping-typed
    field such as ``ray.resources_per_worker`` are not checked)."""
    model: type[BaseModel] | None = Params
    for part in dotted.split("."):
        if model is None:
            return True  # inside a free-form mapping
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


def named_params_keys() -> list[tuple[str, str]]:
    """(where, dotted key) for every params key named in inline code, shell lines and YAML/text
    blocks (Python blocks use ``model`` and ``params`` as variable names)."""
    found = []
    for page in CHECKED_PAGES:
        texts = [(f"{rel(page)}:{n}", code) for n, code in inline_code(page)]
        blocks, _ = split_page(page)
        texts += [(b.where, b.code) for b in blocks if b.language in ("bash", "sh", "shell", "yaml", "text", "")]
        for where, text in texts:
            for match in _PARAM_KEY.finditer(text):
                key = match.group(1)
                if key in NOT_PARAMS or _FILE_SUFFIX.search(key):
                    continue
                found.append((where, key))
    return found


def test_the_key_pattern_finds_keys_and_skips_file_names():
    assert [m.group(1) for m in _PARAM_KEY.finditer("dvc exp run -S train.epochs=20 -S 'model.tasks=[seg]'")] == [
        "train.epochs", "model.tasks"]
    assert [m.group(1) for m in _PARAM_KEY.finditer("data/models/model.onnx and ray.init(x)")] == []
    assert schema_has("train.epochs") and schema_has("data.augment.affine.p") and schema_has("ray.resources_per_worker")
    assert not schema_has("train.epoch") and not schema_has("data.augment.affine.q")


def test_every_params_key_the_docs_name_exists():
    named = named_params_keys()
    assert len(named) > 100, "the docs name params keys; the extraction found almost none"
    missing = sorted({f"{where}: {key}" for where, key in named if not schema_has(key)})
    assert not missing, "the docs name params keys the schema (uml/config.py) does not have:\n" + "\n".join(missing)


def test_every_yaml_params_example_validates():
    """A ```yaml block whose top-level keys are params sections is a params file: it must load."""
    checked = 0
    for page in CHECKED_PAGES:
        blocks, _ = split_page(page)
        for block in blocks:
            if block.language != "yaml":
                continue
            raw = yaml.safe_load(block.code)
            if isinstance(raw, dict) and raw and set(raw) <= set(SECTIONS):
                parse_params(raw, source=block.where)  # a ConfigError names the unknown key
                checked += 1
    assert checked >= 3


# ------------------------------------------------------------------------------- CLI flags
def _options(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def uml_subcommand_options() -> dict[str, set[str]]:
    from uml.cli import _parser

    parser = _parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {name: _options(sub) for name, sub in subparsers.choices.items()}


def stage_options(stage: str) -> set[str] | None:
    from uml.stage import stage_parser

    if not (REPO / "pipeline" / f"{stage}.py").is_file():
        return None
    return _options(stage_parser(stage, ""))


def script_options(script: str) -> set[str] | None:
    if not (REPO / script).is_file():
        return None
    source = (REPO / script).read_text()
    return set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)["']""", source)) | {"--help", "-h"}


def _flags_after(line: str, start: int) -> list[str]:
    rest = re.split(r"&&|\|\||;|\s#\s|\s\|\s", line[start:])[0]
    return [token.strip("[]") for token in rest.split() if token.strip("[]").startswith("--")]


def named_commands() -> list[tuple[str, str, str, list[str]]]:
    """(where, kind, name, flags) for every `uml <command>`, `python -m pipeline.<stage>`,
    `python -m uml.<module>` and benchmarks script the docs run, with the flags given to it."""
    found = []
    for page in CHECKED_PAGES:
        for where, line in shell_lines(page):
            for m in re.finditer(r"(?:^|&&|;|\|)\s*uml ([a-z]+)\b", line):  # uml as the command word
                found.append((where, "uml", m.group(1), _flags_after(line, m.end())))
            for m in re.finditer(r"python -m (pipeline|uml)\.(\w+)", line):
                kind = "pipeline" if m.group(1) == "pipeline" else "module"
                found.append((where, kind, m.group(2), _flags_after(line, m.end())))
            for m in re.finditer(r"(?<![\w/])(benchmarks/\w+\.py)", line):
                found.append((where, "script", m.group(1), _flags_after(line, m.end())))
    return found


def test_every_command_and_flag_the_docs_name_exists():
    subcommands = uml_subcommand_options()
    commands = named_commands()
    kinds = {kind for _, kind, _, _ in commands}
    assert {"uml", "pipeline", "module", "script"} <= kinds and sum(len(f) for *_, f in commands) > 20
    problems = []
    for where, kind, name, flags in commands:
        if kind == "uml":
            known = subcommands.get(name)
        elif kind == "pipeline":
            known = stage_options(name)
        elif kind == "module":
            known = {"--help", "-h"} if (REPO / "uml" / f"{name}.py").is_file() else None
        else:
            known = script_options(name)
        if known is None:
            problems.append(f"{where}: {kind} command '{name}' does not exist")
            continue
        problems += [f"{where}: {kind} command '{name}' has no option {flag}"
                     for flag in flags if flag.split("=")[0] not in known]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ file paths
def _dvc_outputs() -> set[str]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outs = set()
    for stage in dvc["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                outs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return outs


@functools.cache
def _tracked_data_files() -> tuple[str, ...]:
    """The files under data/ that git tracks (data/README.md, data/raw/'s README and .gitignore)."""
    proc = subprocess.run(["git", "ls-files", "--", "data"], cwd=REPO, capture_output=True, text=True, timeout=60)
    return tuple(proc.stdout.split()) if proc.returncode == 0 else ()


def data_path_exists(path: str) -> bool:
    """A path under data/ names a stage output that dvc.yaml declares (or lies inside one),
    Ray's default storage folder, or a file git tracks there (or a folder holding one: data/raw)."""
    path = path.rstrip("/")
    ray_default = Paths(Params()).ray_storage.relative_to(Path.cwd()).as_posix()  # data/ray
    if path in ("data", "data/README.md") or path == ray_default or path.startswith(ray_default + "/"):
        return True
    if any(f == path or f.startswith(path + "/") for f in _tracked_data_files()):
        return True
    return any(path == out or path.startswith(out + "/") or out.startswith(path + "/") for out in _dvc_outputs())


def _python_names(path: Path, names: list[str]) -> bool:
    """Whether ``names`` (``Class.method`` or ``function``) are defined in the module at ``path``."""
    tree = ast.parse(path.read_text())

    def defined(body) -> dict[str, ast.AST]:
        out: dict[str, ast.AST] = {}
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out[node.name] = node
            elif isinstance(node, ast.Assign):
                out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out[node.target.id] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                out.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
            elif isinstance(node, ast.If):
                out.update(defined(node.body))
        return out

    scope = defined(tree.body)
    for name in names:
        node = scope.get(name)
        if node is None:
            return False
        scope = defined(node.body) if isinstance(node, ast.ClassDef) else {}
    return True


def python_name_exists(dotted: str) -> bool:
    """``uml.a.b.Name.attr``: the longest prefix that is a module or package of this repository,
    then the names defined in it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            return _python_names(module, parts[cut:]) if parts[cut:] else True
    return False


def named_paths() -> list[tuple[str, str]]:
    found = []
    for page in CHECKED_PAGES:
        for where, code in [(f"{rel(page)}:{n}", c) for n, c in inline_code(page)]:
            token = code.split()[0] if code.split() else code
            if token in TOP_LEVEL_FILES or _PATH.match(token):
                found.append((where, token))
        for where, line in shell_lines(page):
            for token in line.split():
                if _PATH.match(token) and not token.startswith("data/"):  # data/ in commands is params' data.root
                    found.append((where, token))
    return found


def test_every_file_the_docs_name_exists():
    named = named_paths()
    assert len(named) > 50
    missing = []
    for where, token in named:
        path, _, test_name = token.partition("::")
        if "<" in path or "*" in path or path in USER_FILES:
            continue
        if path.startswith("data/"):
            ok = data_path_exists(path)
        elif path.startswith("benchmarks/results/") and not (REPO / path).exists():
            # an output a benchmark script writes: the script must name it
            ok = any(Path(path).name in s.read_text() for s in (REPO / "benchmarks").glob("*.py"))
        else:
            ok = (REPO / path).exists()
        if ok and test_name:
            ok = _python_names(REPO / path, [test_name])
        if not ok:
            missing.append(f"{where}: {token}")
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_every_python_name_the_docs_name_exists():
    named = []
    for page in CHECKED_PAGES:
        for n, code in inline_code(page):
            for m in re.finditer(r"(?<![\w/.])(uml(?:\.\w+)+)", code):
                if not code[m.end():].startswith((".py", "/")):
                    named.append((f"{rel(page)}:{n}", m.group(1)))
    assert len(named) > 10
    missing = sorted({f"{where}: {name}" for where, name in named if not python_name_exists(name)})
    assert not missing, "the docs name Python objects that do not exist:\n" + "\n".join(missing)


def test_every_link_resolves():
    broken = []
    for page in CHECKED_PAGES:
        for n, target in links(page):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{rel(page)}:{n}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{rel(page)}:{n}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------ the pages as a whole
def _linked_pages(page: Path) -> set[Path]:
    out = set()
    for _, target in links(page):
        path = target.partition("#")[0]
        if path and not re.match(r"^[a-z]+:", path):
            resolved = (page.parent / path).resolve()
            if resolved.is_dir():
                resolved = resolved / "README.md"
            if resolved.suffix == ".md" and resolved.is_file():
                out.add(resolved)
    return out


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        todo += sorted(_linked_pages(page) - seen)
    unreachable = sorted(rel(p) for p in (REPO / "docs").rglob("*.md") if p.resolve() not in seen)
    assert not unreachable, f"not reachable by links from README.md: {unreachable}"


def test_the_readme_stays_short():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024 and len(text.splitlines()) <= 200


@pytest.mark.parametrize("page", USER_PAGES, ids=rel)
def test_user_pages_carry_no_commit_ids_or_history(page):
    text = page.read_text()
    hexes = [h for h in re.findall(r"(?<![\w-])[0-9a-f]{7,40}(?![\w-])", text)
             if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert not hexes, f"commit-like ids {hexes}: history belongs in CHANGELOG.md"
    assert not re.search(r"\bbefore\s*/\s*now\b|\bearlier defaults\b", text, re.IGNORECASE), \
        "before/now history belongs in CHANGELOG.md"


@pytest.mark.parametrize("page", USER_PAGES, ids=rel)
def test_user_pages_point_only_inside_the_repository(page):
    """No page relies on files outside the repository (an earlier design file, a shared folder)."""
    text = page.read_text()
    assert "DESIGN" not in text and "../shared" not in text


def test_research_use_statement():
    for page in (REPO / "README.md", REPO / "docs" / "README.md", REPO / "docs" / "explanation" / "security.md"):
        assert re.search(r"research use only, not for clinical use", page.read_text(), re.IGNORECASE), rel(page)


def test_no_inline_code_breaks_across_lines():
    """The checks above read inline code line by line: a span broken over two lines escapes them."""
    broken = []
    for page in CHECKED_PAGES:
        _, prose = split_page(page)
        broken += [f"{rel(page)}:{n}" for n, text in prose if text.replace("``", "").count("`") % 2]
    assert not broken, f"inline code spans broken across lines: {broken}"


# ------------------------------------------------------------------ the command-line reference
def _cli_reference_sections() -> dict[str, str]:
    """docs/reference/cli.md's ``## `` sections by heading."""
    text = (REPO / "docs" / "reference" / "cli.md").read_text()
    return {part.splitlines()[0].strip(): part for part in re.split(r"^## ", text, flags=re.M)[1:]}


def _flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text))


def test_the_cli_reference_lists_exactly_the_options_of_each_command():
    # The reference's option tables and synopses are prose a code check above cannot reach (a
    # flag in a table row is not a command line); here each `uml` subcommand's section names
    # exactly the parser's options, and the stages' section exactly a stage's.
    sections = _cli_reference_sections()
    problems = []
    for name, options in uml_subcommand_options().items():
        body = sections.get(f"`uml {name}`")
        if body is None:
            problems.append(f"no section for `uml {name}`")
            continue
        named, real = _flags_in(body), options - {"--help", "-h"}
        problems += [f"`uml {name}`: {flag} is documented but not an option" for flag in sorted(named - real)]
        problems += [f"`uml {name}`: option {flag} is not documented" for flag in sorted(real - named)]
    (stages_heading,) = [h for h in sections if "pipeline.<stage>" in h]
    body = sections[stages_heading]
    for stage in sorted(p.stem for p in (REPO / "pipeline").glob("[a-z]*.py")):
        if f"python -m pipeline.{stage} " not in body:
            problems.append(f"the stages' synopsis lacks pipeline.{stage}")
        real = stage_options(stage) - {"--help", "-h"}
        problems += [f"pipeline.{stage}: option {flag} is not documented" for flag in sorted(real - _flags_in(body))]
        problems += [f"pipeline.{stage}: {flag} is documented but not an option" for flag in sorted(_flags_in(body) - real)]
    assert not problems, "\n".join(problems)


def test_the_cli_reference_lists_every_benchmark_script():
    (heading,) = [h for h in _cli_reference_sections() if h.startswith("Benchmark scripts")]
    body = _cli_reference_sections()[heading]
    missing = [p.name for p in sorted((REPO / "benchmarks").glob("[a-z]*.py")) if f"`benchmarks/{p.name}`" not in body]
    assert not missing, f"docs/reference/cli.md's benchmark table lacks {missing}"
