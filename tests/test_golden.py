"""Golden loss curves: every step's training loss of a tiny PGD-AT run (the shared 2-rank reference)
and a tiny TRADES run (1 rank), and their final counts, against the figures checked into
tests/golden/. Training is deterministic, so a change in training numerics (a loss, an attack step,
the schedule, the data order, an initialisation) moves them and fails here; a change meant to move
them rewrites the file with DIST_ROBUST_UPDATE_GOLDEN=1 and says why in its commit."""
import json
import os
from pathlib import Path

import pytest

from conftest import QUICKSTART, REFERENCE, TINY
from dist_robust.cli import main

GOLDEN = Path(__file__).parent / "golden" / "loss_curves.json"
TRADES = [*TINY, "method.name=trades", "train.log_every=1", "train.threads=1", "data.subset=640"]


def _curve(run: Path) -> dict:
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    res = json.loads((run / "results.json").read_text())
    return {"loss": [s["loss"] for s in steps if s["kind"] == "step"],
            "lr": [s["lr"] for s in steps if s["kind"] == "step"],
            "clean_correct": res["clean"]["correct"],
            "attacks_correct": {k: v["correct"] for k, v in res["attacks"].items()}}


def _check(name: str, args: list[str], got: dict) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("DIST_ROBUST_UPDATE_GOLDEN") == "1":
        golden[name] = {"args": args, **got}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    assert name in golden, f"no golden curve for {name}: run with DIST_ROBUST_UPDATE_GOLDEN=1 to record it"
    want = golden[name]
    assert want["args"] == args, f"{name}: the recipe changed since its curve was recorded"
    assert len(got["loss"]) == len(want["loss"]) and got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    for step, (a, b) in enumerate(zip(got["loss"], want["loss"]), 1):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"{name}: step {step} loss {a!r}, golden {b!r}"
    assert (got["clean_correct"], got["attacks_correct"]) == (want["clean_correct"], want["attacks_correct"])


@pytest.mark.multiproc
def test_pgd_at_reference_run_follows_its_golden_curve(reference):
    _check("pgd_at_2_ranks", [QUICKSTART, *REFERENCE], _curve(reference))


def test_trades_run_follows_its_golden_curve(tmp_path):
    assert main(["train", QUICKSTART, *TRADES, f"run.out_dir={tmp_path}", "run.name=trades"]) == 0
    _check("trades_1_rank", [QUICKSTART, *TRADES], _curve(tmp_path / "trades"))
