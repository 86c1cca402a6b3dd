"""Ablation study as DVC experiments: does the uncertainty help? Writes a mean ± std table.

Run it in a clean clone of the repository, with the venv's python (its bin/ goes first on PATH for
DVC and the stages):

    git clone -q <repo> uml-ablation && cd uml-ablation
    /path/to/.venv/bin/python benchmarks/ablation.py                  # 4 variants x 3 seeds, full DAG each
    /path/to/.venv/bin/python benchmarks/ablation.py --variants uml softmax --seeds 2
    /path/to/.venv/bin/python benchmarks/ablation.py --collect-only   # rebuild the table only

Every (variant, seed) pair is one DVC experiment named ``<variant>-s<seed>`` that runs the whole
committed DAG (prepare -> tune -> train -> export -> evaluate):

- ``uml``       no overrides (evidential heads, navigator gating, instructor);
- ``softmax``   ``model.uncertainty=false`` (softmax heads, plain CE/Dice, no gating, no instructor);
- ``seg_only``  ``model.tasks=[seg]`` (single-task segmentation baseline);
- ``cls_only``  ``model.tasks=[cls]`` (single-task classification baseline).

A seed sets ``train.seed`` and ``tune.seed``; ``data.seed`` stays fixed, so every run sees the
same data set and the spread is training noise only. ``--set key=value`` adds ``-S key=value`` to
every experiment before the variant and seed overrides (which win). ``-S`` values are parsed as
YAML: ``--set evaluate.gaussian_sigmas=[0.1,0.2]`` gives a list.

How the experiments run (``--mode``)
------------------------------------
- ``queue``: ``dvc exp run --queue -S ... --name <variant>-s<seed>`` for each, then
  ``dvc exp run --run-all --jobs 1``. DVC's Celery worker runs them one after the other in
  temporary copies under ``.dvc/tmp/exps`` and the workspace is not touched. The metrics are read
  back with ``dvc exp show --json``. If the study is interrupted, DVC's worker may go on with
  the queue: ``dvc queue status``, ``dvc queue kill <name>`` / ``dvc queue stop --kill``.
- ``workspace``: ``dvc exp run -S ... --name <variant>-s<seed>`` one after the other in the
  workspace of ``--repo`` (``params.yaml`` is reset to HEAD before each run and at the end; the
  workspace's ``data/`` and ``dvc.lock`` are left as the last experiment wrote them). The metrics
  file is read from the workspace after each run.
- ``auto`` (default): ``queue`` when experiment commits carry the evaluate stage's metrics file,
  else ``workspace``.

Why the fallback: a queued experiment runs in a temporary copy that DVC deletes when the run ends,
and ``.gitignore`` ignores ``/data/``, so its metrics survive only in the DVC cache. This
repository's ``dvc.yaml`` caches ``data/reports/metrics.json`` (no ``cache: false``) and ``auto``
picks the queue. A fork that marks the metrics ``cache: false`` would leave ``dvc exp show`` with
``FileNotFoundError`` for every queued experiment; ``auto`` then runs them in the workspace, where
the file is there after each run.

Either way each run leaves an experiment that ``dvc exp show`` lists, and a copy of its metrics,
overrides and wall time in ``<out>/runs/<name>.json``. ``--collect-only`` (and the end of every
run) takes each experiment's metrics from ``dvc exp show``, else from that copy when it belongs to
the same experiment commit. Experiments of the plan that already exist with metrics are kept and
not run again (``--rerun`` removes and reruns them). DVC's run-cache restores a stage whose
command, deps and params ran before, so ``prepare`` runs once per study.

Outputs (``--out``, default ``benchmarks/results/`` of the repository this script lives in):
``ablation.md`` (the table, runs, command line, date, machine), ``ablation.csv`` (one row per
variant with ``<metric>_mean``, ``<metric>_std`` and ``<metric>_n``; empty cell: no value),
``runs/<name>.json`` and ``logs/`` (DVC's output). The robustness columns use the strongest noise
found in the metrics keys: the largest ``robust/gaussian_<sigma>`` and ``robust/salt_pepper_<amount>``.
The default study (12 experiments of the ~8-minute DAG) takes about 1.5 h on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

SCRIPT_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPT_REPO))  # run from a checkout without installing

from _machine import cpu_name  # noqa: E402
from uml import provenance  # noqa: E402

# name -> (description, -S overrides); dict order is the table's row order.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "uml": ("UML: evidential heads, navigator gating, instructor", []),
    "softmax": ("softmax heads, no navigator gating, no instructor", ["model.uncertainty=false"]),
    "seg_only": ("segmentation only", ["model.tasks=[seg]"]),
    "cls_only": ("classification only", ["model.tasks=[cls]"]),
}
SEED_KEYS = ("train.seed", "tune.seed")

# (metrics key, label, higher is better)
BASE_COLUMNS: list[tuple[str, str, bool]] = [
    ("cls/auc", "AUC", True),
    ("cls/acc", "ACC", True),
    ("cls/f1", "F1", True),
    ("seg/dice_disc", "Dice disc", True),
    ("seg/dice_cup", "Dice cup", True),
    ("clinical/vcdr_mae", "vCDR MAE", False),
    ("cls/ece", "ECE", False),
    ("unc/error_auroc", "error AUROC", True),
    ("unc/pixel_error_auroc", "pixel error AUROC", True),
]
ROBUST_METRICS = [("cls/auc", "AUC"), ("seg/dice_disc", "Dice disc"), ("seg/dice_cup", "Dice cup")]
NOISE_KINDS = [("gaussian", "Gaussian σ={}"), ("salt_pepper", "s&p {}")]
METRICS_SUFFIX = "reports/metrics.json"
TUNED_OUT = "data/tune/best_params.yaml"
MISSING = "—"

EXP_NAME = re.compile(r"^(?P<variant>[a-z_]+)-s(?P<seed>\d+)$")
RE_EXPERIMENT = re.compile(r"Reproducing experiment '(?P<name>[^']+)'")
RE_STAGE = re.compile(r"Running stage '(?P<stage>[^']+)'")
RE_CACHED = re.compile(r"Stage '(?P<stage>[^']+)' is cached")


def log(msg: str) -> None:
    print(f"[ablation] {msg}", flush=True)


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def exp_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def overrides(variant: str, seed: int, extra: list[str]) -> list[str]:
    """``-S`` values of one experiment: the --set extras, then the variant, then the seed."""
    return [*extra, *VARIANTS[variant][1], *(f"{key}={seed}" for key in SEED_KEYS)]


# ------------------------------------------------------------------------------ processes
class Repo:
    """git and dvc in one repository, with the environment the DVC stages need."""

    def __init__(self, root: Path):
        self.root = root
        self.env = stage_env(root)
        dvc = shutil.which("dvc", path=self.env["PATH"])
        if dvc is None:
            raise SystemExit("ablation: no `dvc` next to this python or on PATH (run it with the venv's python)")
        self.dvc = dvc

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=self.root, env=self.env, text=True, capture_output=True)
        if check and proc.returncode != 0:
            raise SystemExit(f"ablation: `{shlex.join(args)}` failed in {self.root} (exit {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return proc

    def git(self, *args: str, check: bool = True) -> str:
        return self.run("git", *args, check=check).stdout.strip()

    def stream(self, args: list[str], log_path: Path, on_line: Callable[[str], None] | None = None) -> int:
        """Run ``args`` with its output appended to ``log_path``; ``on_line`` sees every line."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as fh:
            fh.write(f"$ {shlex.join(args)}\n")
            fh.flush()
            proc = subprocess.Popen(args, cwd=self.root, env=self.env, text=True, errors="replace",
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    if on_line is not None:
                        on_line(line)
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
                raise
            return proc.wait()


def stage_env(root: Path) -> dict[str, str]:
    """This interpreter's bin/ first on PATH (so that ``python -m pipeline.<stage>`` and ``dvc``
    are the venv's, also in DVC's queue worker, which inherits this environment), offline
    albumentations, and a git identity from the environment when the repository has none
    (experiment commits need one; DVC's git backends honour ``GIT_AUTHOR_*``/``GIT_COMMITTER_*``)."""
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)])
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    for key, fallback in (("name", "uml ablation"), ("email", "ablation@localhost")):
        has = subprocess.run(["git", "config", f"user.{key}"], cwd=root, capture_output=True, text=True).stdout.strip()
        if not has:
            env.setdefault(f"GIT_AUTHOR_{key.upper()}", fallback)
            env.setdefault(f"GIT_COMMITTER_{key.upper()}", fallback)
    return env


def check_repo(repo: Repo, need_clean: bool, out: Path) -> str:
    """Fail clearly unless ``repo`` is the root of a git + DVC repository with a commit (and, to
    run experiments, no uncommitted changes to tracked files). Returns the HEAD commit."""
    top = repo.run("git", "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise SystemExit(f"ablation: {repo.root} is not a git repository")
    if Path(top.stdout.strip()).resolve() != repo.root:
        raise SystemExit(f"ablation: --repo must be the repository's root ({top.stdout.strip()}), got {repo.root}")
    if not (repo.root / ".dvc").is_dir() or not (repo.root / "dvc.yaml").is_file():
        raise SystemExit(f"ablation: {repo.root} is not a DVC repository (no .dvc/ or no dvc.yaml)")
    head = repo.run("git", "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).stdout.strip()
    if not head:
        raise SystemExit(f"ablation: {repo.root} has no commit; DVC experiments need a committed baseline")
    if need_clean:
        dirty = repo.git("status", "--porcelain", "--untracked-files=no")
        if dirty:
            raise SystemExit(f"ablation: {repo.root} has uncommitted changes to tracked files:\n{dirty}\n"
                             "Experiments must run the committed code: commit or stash them, or run the study "
                             "in a clean clone (`git clone -q <repo> <dir>`).")
        untracked = [line[3:] for line in repo.git("status", "--porcelain", "--untracked-files=normal").splitlines()
                     if line.startswith("??")]
        try:
            out_rel = out.relative_to(repo.root).as_posix().rstrip("/") + "/"
        except ValueError:
            out_rel = None
        untracked = [p for p in untracked if not (out_rel and (p.rstrip("/") + "/").startswith(out_rel))
                     and not (out_rel or "").startswith(p.rstrip("/") + "/")]
        if untracked:
            log(f"note: untracked files are not part of the experiments' commits: {', '.join(untracked)}")
    return head


# --------------------------------------------------------------------------------- collect
def metrics_path(repo: Path) -> str:
    """The evaluate stage's metrics file as dvc.yaml names it."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text()) or {}
    for stage in (spec.get("stages") or {}).values():
        for item in stage.get("metrics") or []:
            path = item if isinstance(item, str) else next(iter(item))
            if str(path).endswith(METRICS_SUFFIX):
                return str(path)
    return "data/" + METRICS_SUFFIX


def metrics_in_exp_commits(repo: Repo) -> tuple[bool, str]:
    """Whether ``dvc exp show`` can read the metrics of an experiment whose workspace is gone."""
    spec = yaml.safe_load((repo.root / "dvc.yaml").read_text()) or {}
    path = metrics_path(repo.root)
    top_level = [p if isinstance(p, str) else next(iter(p)) for p in spec.get("metrics") or []]
    if path in top_level:
        return True, f"{path} is a top-level metric (DVC adds it to experiment commits)"
    for stage in (spec.get("stages") or {}).values():
        for item in stage.get("metrics") or []:
            name, opts = (item, {}) if isinstance(item, str) else next(iter(item.items()))
            if name != path:
                continue
            if (opts or {}).get("cache", True):
                return True, f"{path} is DVC-cached"
            if repo.run("git", "check-ignore", "-q", "--no-index", path, check=False).returncode == 0:
                return False, f"{path} is `cache: false` and git-ignored, so experiment commits leave it out"
            return True, f"{path} is committed to git with each experiment"
    return False, f"no stage metrics file ending in {METRICS_SUFFIX} in dvc.yaml"


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """``{"cls": {"auc": 0.9}}`` -> ``{"cls/auc": 0.9}``: DVC's metric names."""
    return provenance.flatten(data, sep="/")


def exp_show(repo: Repo, baseline: str) -> dict[str, dict[str, Any]]:
    """Finished experiments of ``baseline``: name -> {rev, metrics, params}. Queued, running and
    failed entries (no experiment ref) are left out."""
    proc = repo.run(repo.dvc, "exp", "show", "--json", "--rev", baseline, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ablation: `dvc exp show` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    text = proc.stdout
    data = json.loads(text[text.index("["):]) if "[" in text else []
    prefix = f"refs/exps/{baseline[:2]}/{baseline[2:]}/"
    refs = {line.split()[1][len(prefix):]: line.split()[0]
            for line in repo.git("for-each-ref", "--format=%(objectname) %(refname)", prefix).splitlines()}
    mpath = metrics_path(repo.root)
    found: dict[str, dict[str, Any]] = {}
    for entry in data:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name")
                if name not in refs or rev.get("rev") != refs[name]:
                    continue
                body = rev.get("data") or {}
                files = body.get("metrics") or {}
                chosen = files.get(mpath) or {}
                metrics = flatten(chosen["data"]) if isinstance(chosen.get("data"), dict) else {}
                params = ((body.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                tuned_hash = ((body.get("outs") or {}).get(TUNED_OUT) or {}).get("hash")
                found[name] = {"rev": refs[name], "metrics": metrics, "params": params,
                               "tuned": tuned_values(repo.root, tuned_hash)}
    return found


def tuned_values(root: Path, md5: str | None) -> dict[str, Any] | None:
    """What the experiment's sweep chose (``best_params.yaml`` read from the DVC cache by its hash:
    a queued experiment's outputs live only there): the params sections and ``selection.chosen``."""
    if not md5:
        return None
    path = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    values = {k: v for k, v in flatten({k: v for k, v in raw.items() if k not in ("selection", "tuned_for")}).items()}
    return {"chosen": (raw.get("selection") or {}).get("chosen"), **values}


def dvc_out_hash(root: Path, out: str) -> str | None:
    """The md5 that the workspace's ``dvc.lock`` records for an output."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            if entry.get("path") == out:
                return entry.get("md5")
    return None


def read_runs(out: Path) -> dict[str, dict[str, Any]]:
    runs = {}
    for path in sorted((out / "runs").glob("*.json")):
        try:
            item = json.loads(path.read_text())
            runs[item["name"]] = item
        except (OSError, ValueError, KeyError):
            continue
    return runs


def write_run(out: Path, item: dict[str, Any]) -> None:
    path = out / "runs" / f"{item['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(item, indent=2, default=str) + "\n")


def same_value(a: Any, b: Any) -> bool:
    """Equal, also where YAML 1.1 and 1.2 read a number differently (``1e-4``: str vs float)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if a == b:
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if not all(isinstance(x, (int, float, str)) for x in (a, b)):
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def param_mismatches(params: dict[str, Any], wanted: list[str]) -> list[str]:
    """The ``key=value`` overrides that ``params`` (params.yaml as a dict) does not hold."""
    bad = []
    for item in wanted:
        key, text = item.split("=", 1)
        node: Any = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not same_value(node, yaml.safe_load(text)):
            bad.append(f"{key}={json.dumps(node)} (want {text})")
    return bad


def collect(repo: Repo, baseline: str, out: Path, variants: list[str], seeds: set[int] | None,
            extra: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per finished ``<variant>-s<seed>`` experiment of ``baseline`` that has metrics:
    from ``dvc exp show``, else from ``<out>/runs/<name>.json`` written for that same commit. An
    experiment whose params do not hold its variant's and seed's overrides (and ``extra``, when
    given) is left out with a warning."""
    runs = read_runs(out)
    records = []
    for name, exp in exp_show(repo, baseline).items():
        match = EXP_NAME.match(name)
        if not match or match["variant"] not in variants or (seeds is not None and int(match["seed"]) not in seeds):
            continue
        wanted = {o.split("=", 1)[0]: o for o in overrides(match["variant"], int(match["seed"]), extra or [])}
        if bad := param_mismatches(exp["params"], list(wanted.values())):
            log(f"warning: {name} left out, its params differ from the study's: {', '.join(bad)}")
            continue
        kept = runs.get(name, {})
        same = kept.get("rev") == exp["rev"]
        metrics, source = exp["metrics"], "dvc exp show"
        if not metrics and same and kept.get("metrics"):
            metrics, source = kept["metrics"], f"runs/{name}.json"
        if not metrics:
            continue
        tuned = exp.get("tuned") or (kept.get("tuned") if same else None)
        records.append({"name": name, "variant": match["variant"], "seed": int(match["seed"]), "rev": exp["rev"],
                        "metrics": metrics, "source": source, "elapsed_s": kept.get("elapsed_s") if same else None,
                        "tuned": tuned})
    records.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
    return records


# ------------------------------------------------------------------------------------ run
class Progress:
    """One line per experiment and stage, with elapsed times, from DVC's output."""

    def __init__(self, total: int):
        self.total, self.count, self.study_start = total, 0, time.perf_counter()
        self.current: str | None = None
        self.started = 0.0
        self.elapsed: dict[str, float] = {}

    def start(self, name: str) -> None:
        self.finish()
        self.count += 1
        self.current, self.started = name, time.perf_counter()
        log(f"({self.count}/{self.total}) {name}: running (study time {fmt_time(time.perf_counter() - self.study_start)})")

    def finish(self, status: str = "") -> None:
        if self.current is None:
            return
        self.elapsed[self.current] = time.perf_counter() - self.started
        log(f"    {self.current}: finished{status} in {fmt_time(self.elapsed[self.current])}")
        self.current = None

    def on_line(self, line: str) -> None:
        if m := RE_EXPERIMENT.search(line):
            if m["name"] != self.current:
                self.start(m["name"])
        elif self.current and (m := RE_STAGE.search(line) or RE_CACHED.search(line)):
            how = "" if m.re is RE_STAGE else " (restored from the run-cache)"
            log(f"    {self.current}: stage {m['stage']}{how} at +{fmt_time(time.perf_counter() - self.started)}")


def queue_busy(repo: Repo) -> int:
    status = repo.run(repo.dvc, "queue", "status", check=False).stdout
    return sum(1 for line in status.splitlines() if re.search(r"\b(Queued|Running)\b", line))


def run_queue(repo: Repo, plan: list[tuple[str, int]], extra: list[str], out: Path, baseline: str) -> dict[str, float]:
    """Queue every experiment and run the queue; returns wall time per experiment."""
    if busy := queue_busy(repo):
        raise SystemExit(f"ablation: DVC's queue in {repo.root} holds {busy} queued or running experiment(s) that "
                         "`--run-all` would run too; wait for them or `dvc queue remove --queued`")
    log_path = out / "logs" / "queue.log"
    log_path.unlink(missing_ok=True)
    for variant, seed in plan:
        args = [repo.dvc, "exp", "run", "--queue",
                *[a for o in overrides(variant, seed, extra) for a in ("-S", o)], "--name", exp_name(variant, seed)]
        if repo.stream(args, log_path) != 0:
            raise SystemExit(f"ablation: queueing {exp_name(variant, seed)} failed; see {log_path}")
    log(f"queued {len(plan)} experiment(s); `dvc exp run --run-all --jobs 1` (DVC output: {log_path})")
    progress = Progress(len(plan))
    rc = repo.stream([repo.dvc, "exp", "run", "--run-all", "--jobs", "1"], log_path, on_line=progress.on_line)
    progress.finish()
    if rc != 0:
        log(f"`dvc exp run --run-all` exited {rc}; see {log_path} and `dvc queue logs <name>`")
    return progress.elapsed


def run_workspace(repo: Repo, plan: list[tuple[str, int]], extra: list[str], out: Path,
                  baseline: str) -> dict[str, float]:
    """Run the experiments one by one in the workspace; keep a copy of each one's metrics."""
    mpath = repo.root / metrics_path(repo.root)
    prefix = f"refs/exps/{baseline[:2]}/{baseline[2:]}/"
    lock_tracked = bool(repo.git("ls-files", "dvc.lock"))
    progress = Progress(len(plan))
    try:
        for variant, seed in plan:
            name = exp_name(variant, seed)
            repo.git("checkout", "-q", baseline, "--", "params.yaml")  # no override carries over
            mpath.unlink(missing_ok=True)  # no stale file from the run before
            ovr = overrides(variant, seed, extra)
            args = [repo.dvc, "exp", "run", *[a for o in ovr for a in ("-S", o)], "--name", name]
            log_path = out / "logs" / f"{name}.log"
            log_path.unlink(missing_ok=True)
            progress.start(name)
            rc = repo.stream(args, log_path, on_line=progress.on_line)
            rev = repo.git("rev-parse", "--verify", "-q", prefix + name, check=False)
            try:
                metrics = flatten(json.loads(mpath.read_text())) if rc == 0 else {}
            except (OSError, ValueError):
                metrics = {}
            ok = rc == 0 and bool(rev) and bool(metrics)
            progress.finish(" ok" if ok else " FAILED")
            if not ok:
                tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
                log(f"    {name}: exit {rc}, experiment ref {'found' if rev else 'missing'}, "
                    f"metrics {'found' if metrics else 'missing'}; end of {log_path}:\n{tail}")
                continue
            write_run(out, {"name": name, "variant": variant, "seed": seed, "baseline": baseline, "rev": rev,
                            "mode": "workspace", "overrides": ovr, "elapsed_s": round(progress.elapsed[name], 1),
                            "finished": now_iso(), "metrics": metrics,
                            "tuned": tuned_values(repo.root, dvc_out_hash(repo.root, TUNED_OUT))})
    finally:
        repo.git("checkout", "-q", baseline, "--", "params.yaml", *(["dvc.lock"] if lock_tracked else []), check=False)
    return progress.elapsed


# ---------------------------------------------------------------------------------- table
def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def strongest(records: list[dict[str, Any]], kind: str) -> str | None:
    """The level string of the largest ``robust/<kind>_<level>/`` in any record's keys."""
    pattern = re.compile(rf"^robust/{kind}_(?P<level>[^/]+)/")
    best: tuple[float, str] | None = None
    for rec in records:
        for key in rec["metrics"]:
            if m := pattern.match(key):
                try:
                    level = float(m["level"])
                except ValueError:
                    continue
                if best is None or level > best[0]:
                    best = (level, m["level"])
    return best[1] if best else None


def columns(records: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    cols = list(BASE_COLUMNS)
    for kind, label in NOISE_KINDS:
        if (level := strongest(records, kind)) is not None:
            cols += [(f"robust/{kind}_{level}/{key}", f"{name}, {label.format(level)}", True) for key, name in ROBUST_METRICS]
            # Does the uncertainty notice the noise? AUROC of u (image) and mean U (pixel map) separating noisy from clean inputs.
            cols += [(f"unc/noise_auroc_{kind}_{level}", f"u noise AUROC, {label.format(level)}", True),
                     (f"unc/pixel_noise_auroc_{kind}_{level}", f"U noise AUROC, {label.format(level)}", True)]
    return cols


def stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def machine() -> list[str]:
    lines = [f"CPU: {os.cpu_count()} logical CPUs ({cpu_name()}); {platform.system()} {platform.release()}; "
             f"Python {platform.python_version()}"]
    try:
        import torch

        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            gpu = f"{torch.cuda.device_count()} × {', '.join(names)} (CUDA {torch.version.cuda})"
        else:
            gpu = "none (torch sees no CUDA device)"
        versions = [f"torch {torch.__version__}"]
    except Exception as exc:  # noqa: BLE001 - report, never fail the table over it
        gpu, versions = f"unknown (torch: {type(exc).__name__})", []
    for module in ("ray", "dvc", "onnxruntime"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except Exception:  # noqa: BLE001
            pass
    return lines + [f"GPU: {gpu}", "Versions: " + ", ".join(versions)]


def write_tables(records: list[dict[str, Any]], variants: list[str], out: Path, *, command: str, baseline: str,
                 extra: list[str], mode: str, missing: list[str], wall: float | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(records)
    groups = {v: [r for r in records if r["variant"] == v] for v in variants}

    def values(recs: list[dict[str, Any]], key: str) -> list[float]:
        return [x for r in recs if (x := number(r["metrics"].get(key))) is not None]

    with open(out / "ablation.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "runs", "seeds", *[f"{key}_{s}" for key, _, _ in cols for s in ("mean", "std", "n")]])
        for variant, recs in groups.items():
            row: list[Any] = [variant, len(recs), " ".join(str(r["seed"]) for r in recs)]
            for key, _, _ in cols:
                vals = values(recs, key)
                mean, std = stats(vals)
                row += ["" if mean is None else repr(mean), "" if std is None else repr(std), len(vals)]
            writer.writerow(row)

    def cell(recs: list[dict[str, Any]], key: str) -> str:
        vals = values(recs, key)
        mean, std = stats(vals)
        if mean is None:
            return MISSING
        text = f"{mean:.3f}"
        low, high = values(recs, f"{key}_ci95_low"), values(recs, f"{key}_ci95_high")
        if low and high:  # the runs' bootstrap intervals over test images, averaged over seeds
            text += f" [{statistics.fmean(low):.2f}, {statistics.fmean(high):.2f}]"
        text += f" ± {std:.3f}" if std is not None else ""
        return text + (f" (n={len(vals)})" if len(vals) < len(recs) else "")

    header = ["variant", "runs", *[f"{label} {'↑' if up else '↓'}" for _, label, up in cols]]
    lines = ["# Ablation: does the uncertainty help?", "",
             "| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(cols)]
    for variant, recs in groups.items():
        lines.append(f"| `{variant}` | {len(recs)} | " + " | ".join(cell(recs, key) for key, _, _ in cols) + " |")
    lines += ["",
              f"Mean [95 % interval] ± sample standard deviation over the seeds (a seed sets "
              f"{' and '.join(f'`{k}`' for k in SEED_KEYS)}; the data set is the same for every run). The interval is "
              "each run's bootstrap interval over the test images (`<key>_ci95_low/high` in metrics.json) averaged over "
              "the seeds: the test-set sampling noise of one run; ± is the training noise between seeds. Read a "
              "difference only where both allow it. "
              f"{MISSING}: the variant has no such output, or the metric was undefined (e.g. AUC on a one-class "
              "test split); (n=k): only k runs had a value. ↑/↓: higher/lower is better. Robustness columns: "
              "the strongest noise level evaluated.", "", "## Variants", ""]
    for variant in variants:
        desc, ovr = VARIANTS[variant]
        lines.append(f"- `{variant}`: {desc}; overrides: {', '.join(f'`{o}`' for o in ovr) or 'none'}")
    lines += ["", "## Runs", "", "| experiment | commit | wall time | metrics from | tuned values used |", "|---|---|---:|---|---|"]
    for r in records:
        wall_r = MISSING if r["elapsed_s"] is None else fmt_time(r["elapsed_s"])
        tuned = r.get("tuned") or {}
        tuned_text = (f"{tuned.get('chosen') or '?'}: " + ", ".join(f"{k.split('/')[-1]} {v:.3g}" if isinstance(v, float) else
                                                                    f"{k.split('/')[-1]} {v}" for k, v in tuned.items()
                                                                    if k != "chosen")) if tuned else MISSING
        lines.append(f"| `{r['name']}` | `{r['rev'][:7]}` | {wall_r} | {r['source']} | {tuned_text} |")
    if missing:
        lines += ["", f"Failed or missing: {', '.join(f'`{n}`' for n in missing)}."]
    lines += ["", "## Set-up", "", f"- Command: `{command}`",
              f"- Date: {now_iso()}" + (f"; study wall time {fmt_time(wall)}" if wall is not None else ""),
              f"- Baseline commit: `{baseline}`; DVC experiments ({mode})",
              f"- Overrides for every run (`--set`): {', '.join(f'`{o}`' for o in extra) or 'none'}",
              *[f"- {line}" for line in machine()]]
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    return text


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repo", type=Path, default=SCRIPT_REPO,
                        help="root of the git + DVC repository whose committed pipeline runs")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                        help=f"variants, from: {' '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (train.seed = tune.seed)")
    parser.add_argument("--set", dest="extra", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `-S KEY=VALUE` for every experiment (several per flag; repeatable)")
    parser.add_argument("--out", type=Path, default=SCRIPT_REPO / "benchmarks" / "results", help="folder for the table")
    parser.add_argument("--collect-only", action="store_true", help="run nothing; rebuild the table from the experiments")
    parser.add_argument("--mode", choices=("auto", "queue", "workspace"), default="auto", help="how experiments run")
    parser.add_argument("--rerun", action="store_true", help="remove and rerun experiments of the plan that exist")
    args = parser.parse_args(argv)
    args.extra = [item for group in args.extra for item in group]
    for item in args.extra:
        key = item.split("=", 1)[0]
        if "=" not in item or not key:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        if key in (*SEED_KEYS, "model.uncertainty", "model.tasks"):
            log(f"warning: --set {item} is overridden by the study's variant or seed settings")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    args.variants = [v for v in VARIANTS if v in args.variants]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", sys.argv[0], *argv])
    repo = Repo(args.repo.expanduser().resolve())
    out = args.out.expanduser().resolve()
    baseline = check_repo(repo, need_clean=not args.collect_only, out=out)
    started = time.perf_counter()
    plan = [(v, s) for v in args.variants for s in range(args.seeds)]
    names = [exp_name(v, s) for v, s in plan]

    if args.collect_only:
        records = collect(repo, baseline, out, args.variants, None)
        mode, missing, wall = "collected from existing experiments", [], None
        log(f"{len(records)} experiment(s) with metrics on {baseline[:7]}")
    else:
        existing = exp_show(repo, baseline)
        done = {r["name"] for r in collect(repo, baseline, out, args.variants, set(range(args.seeds)), args.extra)}
        todo = [(v, s) for v, s in plan if args.rerun or exp_name(v, s) not in done]
        stale = [n for n in names if n in existing and (args.rerun or n not in done)]
        if stale and not args.rerun:
            raise SystemExit(f"ablation: experiment(s) {', '.join(stale)} exist without metrics or with other params "
                             "than this study's; rerun them with --rerun, or `dvc exp remove` them")
        if stale:
            log(f"removing {', '.join(stale)} to rerun them")
            repo.run(repo.dvc, "exp", "remove", *stale)
        if kept := [n for n in names if n in done and not args.rerun]:
            log(f"already done, kept (--rerun reruns them): {', '.join(kept)}")
        carried, why = metrics_in_exp_commits(repo)
        mode = args.mode if args.mode != "auto" else ("queue" if carried else "workspace")
        if mode == "queue" and not carried:
            log(f"warning: {why}; `dvc exp show` will have no metrics for queued experiments")
        log(f"{len(plan)} experiment(s) planned, {len(todo)} to run on {baseline[:7]} in {repo.root}; "
            f"mode {mode} ({why})")
        elapsed: dict[str, float] = {}
        if todo:
            runner = run_queue if mode == "queue" else run_workspace
            elapsed = runner(repo, todo, args.extra, out, baseline)
        records = collect(repo, baseline, out, args.variants, set(range(args.seeds)), args.extra)
        shown = exp_show(repo, baseline)
        for r in records:  # keep a copy of what the queue produced, for --collect-only
            if r["name"] in elapsed and r["source"] == "dvc exp show":
                v, s = r["variant"], r["seed"]
                r["elapsed_s"] = round(elapsed[r["name"]], 1)
                write_run(out, {"name": r["name"], "variant": v, "seed": s, "baseline": baseline, "rev": r["rev"],
                                "mode": mode, "overrides": overrides(v, s, args.extra), "elapsed_s": r["elapsed_s"],
                                "finished": now_iso(), "params": shown[r["name"]]["params"], "metrics": r["metrics"],
                                "tuned": r.get("tuned")})
        got = {r["name"] for r in records}
        missing = [n for n in names if n not in got]
        wall = time.perf_counter() - started
        mode = "`dvc exp run --queue` + `--run-all --jobs 1`" if mode == "queue" else "`dvc exp run` in the workspace"

    text = write_tables(records, args.variants, out, command=command, baseline=baseline, extra=args.extra,
                        mode=mode, missing=missing, wall=wall)
    print("\n" + text, flush=True)
    log(f"wrote {out / 'ablation.md'} and {out / 'ablation.csv'} ({len(records)} experiment(s), "
        f"{fmt_time(time.perf_counter() - started)})")
    if not records:
        log("no finished experiments with metrics")
        return 1
    if missing:
        log(f"failed or missing: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
