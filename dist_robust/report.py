"""JSON-lines logs, results tables and ``dist-robust report``."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import dist


class JsonlLog:
    """Appends one JSON object per line, with wall and relative time. A None path writes nothing
    (the other ranks)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.t0 = time.time()

    def write(self, **record) -> None:
        if self.path is None:
            return
        record = {"time": time.time(), "relative_time": time.time() - self.t0, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def load_results(path: Path) -> dict:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read results {p}: {e}") from None


def read_log(run_dir: Path) -> list[dict]:
    """The records of a run's log.jsonl ([] without one). A torn line (a run still writing, or killed
    mid-write) is skipped rather than failing the whole report."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict)]


def train_seconds(run_dir: Path) -> float | None:
    """A run's training time from its log.jsonl (None when there is no log): the epochs' wall times,
    plus, for each resume in the middle of an epoch, what the process before it spent in that epoch.

    The epoch record is written by the process that finished the epoch and times only its own part,
    from its resume. The earlier process's part, up to the checkpoint resumed from, is measured by the
    wall times that process logged (``_before_checkpoint``). The steps it trained after that checkpoint
    are counted once: the resume dropped their records (tensorboard.forget_after) and trained them again.
    """
    if not (Path(run_dir) / "log.jsonl").is_file():
        return None
    records = read_log(run_dir)
    total = sum(r.get("seconds", 0.0) for r in records if r.get("kind") == "epoch")
    for i, r in enumerate(records):
        if r.get("kind") == "resume" and r.get("batch") and "epoch" in r and "step" in r:
            total += _before_checkpoint(records[:i], r["epoch"], r["step"])
    return total


def _before_checkpoint(earlier: list[dict], epoch: int, step: int) -> float:
    """Seconds the process that wrote the last of ``earlier`` spent training ``epoch`` up to ``step``:
    from its last record before the epoch's first step (the previous epoch's epoch or val record, its
    own resume marker, or else its start: time - relative_time) to its last step record, carried on at
    that pace to ``step`` (the checkpoint need not be a logged step). Nothing logged: 0."""
    starts = [i for i, r in enumerate(earlier) if r.get("kind") == "resume"]
    own = earlier[starts[-1]:] if starts else earlier  # that process's records
    steps = [i for i, r in enumerate(own) if r.get("kind") == "step" and r.get("epoch") == epoch
             and isinstance(r.get("time"), (int, float)) and isinstance(r.get("step"), int)]
    if not steps:
        return 0.0
    first, last = own[steps[0]], own[steps[-1]]
    begin = own[steps[0] - 1] if steps[0] else {"time": first["time"] - first.get("relative_time", 0.0), "step": 0}
    if not isinstance(begin.get("time"), (int, float)) or not isinstance(begin.get("step"), int):
        return 0.0
    seconds, done = last["time"] - begin["time"], last["step"] - begin["step"]
    return max(0.0, seconds * (step - begin["step"]) / done if done > 0 else seconds)


def progress(iterable, total, desc):
    """A tqdm bar on rank 0 when stderr is a terminal; plain iteration otherwise."""
    if dist.is_main() and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


# ---------------------------------------------------------------- finding the files

@dataclass
class Found:
    """What the paths given to ``report`` hold."""
    results: list[tuple[Path, dict]] = field(default_factory=list)      # results files (training or eval)
    comparisons: list[tuple[Path, dict]] = field(default_factory=list)  # results/finetune.json-like files
    run_dirs: list[Path] = field(default_factory=list)                  # folders with a log.jsonl (curves)
    skipped: list[str] = field(default_factory=list)                    # one line per path not used


def _search(folder: Path) -> list[Path]:
    """A run folder's results.json; in a folder of runs, every results.json and eval-*.json below it."""
    if (folder / "results.json").is_file():
        return [folder / "results.json"]
    found = [p for pattern in ("results.json", "eval-*.json") for p in folder.rglob(pattern) if p.is_file()]
    return sorted(set(found))


def collect(paths: list[str]) -> Found:
    found, seen = Found(), set()
    for given in map(Path, paths):
        if given.is_dir():
            files = _search(given)
            logs = [given / "log.jsonl"] if (given / "log.jsonl").is_file() else sorted(given.rglob("log.jsonl"))
            for run in (log.parent for log in logs):
                finished = (run / "results.json").is_file()
                if run == given or not finished:  # curves even before (or without) results.json
                    found.run_dirs.append(run)
                if not finished:  # a run not in the table says so: a missing row is easily missed
                    found.skipped.append(f"{run}: {unfinished(run)}: not in the table")
            if not files and not logs:
                found.skipped.append(f"{given}: no results.json or eval-*.json in or below it")
        elif given.is_file():
            files = [given]
        else:
            found.skipped.append(f"{given}: no such file or folder")
            continue
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                found.skipped.append(f"{f}: cannot read it ({e})")
                continue
            if isinstance(data, dict) and isinstance(data.get("runs"), dict):
                found.comparisons.append((f, data))
            elif isinstance(data, dict) and any(k in data for k in ("clean", "attacks", "radii")):
                found.results.append((f, data))
                if is_training(f, data) and (f.parent / "log.jsonl").is_file() and f.parent not in found.run_dirs:
                    found.run_dirs.append(f.parent)
            else:
                found.skipped.append(f"{f}: not a results file (no clean, attacks or radii key)")
    return found


def unfinished(run: Path) -> str:
    """Why a run folder with a log.jsonl has no results.json, as far as its files tell cheaply."""
    if (run / "model.json").is_file():  # eval.at_end false, or killed in the final evaluation
        return f"trained but not evaluated (no results.json; dist-robust eval --checkpoint {run} evaluates it)"
    epochs = [r["epoch"] for r in read_log(run) if r.get("kind") == "epoch" and isinstance(r.get("epoch"), int)]
    import yaml
    try:
        of = f" of {int(yaml.safe_load((run / 'config.yaml').read_text())['train']['epochs'])}"
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):  # no config.yaml yet: the count alone
        of = ""
    return f"unfinished (no results.json; {max(epochs, default=0)}{of} epochs logged)"


# ---------------------------------------------------------------- the table

def is_training(path: Path, r: dict) -> bool:
    """results.json written by training names the model.json of its own folder; anything else (an
    eval-*.json, a --out file) is a standalone evaluation of the checkpoint it names."""
    checkpoint = Path(r.get("checkpoint") or path.parent / "model.json")
    own = checkpoint.name == "model.json" and checkpoint.parent.name == path.parent.name
    return path.name == "results.json" and own


def model_name(path: str) -> str:
    """A short name of a model: its run folder, plus the file for an epoch or step checkpoint."""
    p = Path(path)
    stem = p.stem if p.suffix in (".json", ".safetensors", ".pt", ".pth") else p.name
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{stem}"
    return p.parent.name if stem == "model" and p.parent.name else stem


def format_eps(eps) -> str:
    """0.1 stays 0.1; 8/255 reads 8/255, not 0.03137."""
    if not isinstance(eps, (int, float)):
        return "-" if eps is None else str(eps)
    short = f"{eps:.4g}"
    if abs(float(short) - eps) < 1e-12:
        return short
    k = round(eps * 255)
    return f"{k}/255" if abs(eps * 255 - k) < 1e-9 else short


def radii(r: dict) -> list[tuple[float | None, str | None, dict[str, float | None]]]:
    """(eps, norm, {attack: accuracy}) for each radius of a results file: one per entry of a multi-radius
    eval's ``radii``, else its attacks grouped by their eps (a single group in files written today)."""
    cfg = r.get("config", {})
    default_norm = r.get("norm") or cfg.get("eval", {}).get("norm") or cfg.get("attack", {}).get("norm")
    if isinstance(r.get("radii"), list):
        groups = [(x.get("eps"), x.get("attacks", {})) for x in r["radii"]]
    else:
        by_eps: dict = {}
        for name, a in r.get("attacks", {}).items():
            by_eps.setdefault(a.get("eps"), {})[name] = a
        groups = list(by_eps.items())
    rows = []
    for eps, attacks in groups:
        norms = {a.get("norm") for a in attacks.values()} - {None}
        norm = norms.pop() if len(norms) == 1 else default_norm
        rows.append((eps, norm, {name: a.get("acc") for name, a in attacks.items()}))
    return rows or [(None, default_norm, {})]


def _percent(acc) -> str:
    return f"{100 * acc:.2f}" if isinstance(acc, (int, float)) else "-"


def run_label(path: Path, r: dict) -> str:
    """The table's name of a results file: its run folder, or folder/file for an evaluation."""
    return path.parent.name if is_training(path, r) else f"{path.parent.name}/{path.name}"


def _row_labels(path: Path, r: dict) -> tuple[str, str, str]:
    """(run, source, train seconds) of a results file."""
    if is_training(path, r):
        source = r.get("config", {}).get("model", {}).get("init_from")
        seconds = train_seconds(path.parent)
        return run_label(path, r), model_name(source) if source else "scratch", \
            f"{seconds:.0f}" if seconds is not None else "-"
    # An evaluation's config has init_from cleared (the checkpoint is the model): name what was evaluated.
    evaluated = model_name(r["checkpoint"]) if r.get("checkpoint") else "?"
    return run_label(path, r), f"eval of {evaluated}", "-"


def results_table(results: list[tuple[Path, dict]]) -> str:
    """A Markdown table: one row per results file and radius, clean and attack accuracies in %."""
    rows = []
    for path, r in results:
        run, source, seconds = _row_labels(path, r)
        cfg = r.get("config", {})
        dataset = r.get("dataset", "?") + (f"/{r['split']}" if r.get("split") not in (None, "test") else "")
        for eps, norm, accs in radii(r):
            rows.append({"run": run, "model": cfg.get("model", {}).get("name") or "?", "source": source,
                         "method": cfg.get("method", {}).get("name", "?"),
                         "dataset": dataset, "n": str(r.get("n", "?")), "norm": norm or "-", "eps": format_eps(eps),
                         "clean": _percent(r.get("clean", {}).get("acc")), "accs": accs, "seconds": seconds})
    attacks = sorted({a for row in rows for a in row["accs"]}, key=lambda a: (len(a), a))
    mixed_norms = len({row["norm"] for row in rows} - {"-"}) > 1
    keys = ["run", "model", "source", "method", "dataset", "n"] + (["norm"] if mixed_norms else []) + ["eps", "clean"]
    head = keys + attacks + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row[k] for k in keys] + [_percent(row["accs"].get(a)) for a in attacks] + [row["seconds"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
