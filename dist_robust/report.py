"""JSON-lines logs and results tables."""
from __future__ import annotations

import json
import sys
import time
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


def train_seconds(run_dir: Path) -> float | None:
    """Sum of the epochs' wall times in a run's log.jsonl (None when there is no log)."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return sum(r["seconds"] for r in records if r.get("kind") == "epoch")


def results_table(paths: list[str]) -> str:
    """A Markdown table: one row per run (folder or results.json), clean and attack accuracies in %."""
    rows = []
    for p in map(Path, paths):
        run_dir = p if p.is_dir() else p.parent
        rows.append((run_dir, load_results(p)))
    attacks = sorted({a for _, r in rows for a in r["attacks"]}, key=lambda a: (len(a), a))
    head = ["run", "source", "method", "dataset", "n", "clean"] + attacks + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run_dir, r in rows:
        cfg = r.get("config", {})
        source = cfg.get("model", {}).get("init_from")
        seconds = train_seconds(run_dir)
        cells = [run_dir.name, Path(source).name if source else "scratch", cfg.get("method", {}).get("name", "?"),
                 r["dataset"], str(r["n"]), f"{100 * r['clean']['acc']:.2f}"]
        cells += [f"{100 * r['attacks'][a]['acc']:.2f}" if a in r["attacks"] else "-" for a in attacks]
        cells.append(f"{seconds:.0f}" if seconds is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress(iterable, total, desc):
    """A tqdm bar on rank 0 when stderr is a terminal; plain iteration otherwise."""
    if dist.is_main() and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable
