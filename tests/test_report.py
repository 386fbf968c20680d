"""``dist-robust report``: the table over run folders, folders of runs and eval files, and --plot's PNGs.
Every file is written by hand in the formats training and ``dist-robust eval`` write."""
import json
from pathlib import Path

import pytest

from dist_robust.cli import main
from dist_robust.report import format_eps


def _attack(acc, eps=0.1, norm="Linf"):
    return {"correct": round(acc * 100), "acc": acc, "eps": eps, "norm": norm, "steps": 20, "loss": "ce"}


def _config(method="pgd_at", init_from=None, norm="Linf"):
    return {"method": {"name": method}, "model": {"name": "cnn3", "init_from": init_from},
            "attack": {"eps": 0.1, "norm": norm}, "eval": {"eps": None, "norm": None}}


def _training_run(folder: Path, clean=0.9, robust=0.5, eps=0.1, norm="Linf", init_from=None, log=True) -> Path:
    """A finished training run: results.json naming its own model.json, and a log.jsonl."""
    folder.mkdir(parents=True)
    results = {"dataset": "digits", "split": "test", "n": 100, "world_size": 1,
               "clean": {"correct": round(clean * 100), "acc": clean},
               "attacks": {"pgd-20": _attack(robust, eps, norm)}, "checkpoint": str(folder / "model.json"),
               "seconds": 1.0, "config": _config(init_from=init_from, norm=norm)}
    (folder / "results.json").write_text(json.dumps(results))
    if log:
        _log(folder / "log.jsonl", epochs=3, steps_per_epoch=10, val=True)
    return folder


def _log(path: Path, epochs: int, steps_per_epoch: int, val: bool) -> None:
    lines = []
    for e in range(1, epochs + 1):
        for s in range(5, steps_per_epoch + 1, 5):
            step = (e - 1) * steps_per_epoch + s
            lines.append({"kind": "step", "epoch": e, "step": step, "lr": 0.1 / step, "loss": 2.0 / step})
        lines.append({"kind": "epoch", "epoch": e, "step": e * steps_per_epoch, "lr": 0.01, "loss": 1.0 / e,
                      "train_acc": 0.3 * e, "seconds": 2.0, "images_per_s": 100.0})
        if val:  # tolerant of missing keys: the last val line has no attacks
            attacks = {"pgd-10": {"acc": 0.2 * e}} if e < epochs else None
            lines.append({"kind": "val", "epoch": e, "step": e * steps_per_epoch, "clean": {"acc": 0.3 * e},
                          **({"attacks": attacks} if attacks else {})})
    path.write_text("\n".join(map(json.dumps, lines)) + "\n{\"kind\": \"ste")  # a torn last line


def _eval_file(path: Path, checkpoint: Path, eps=8 / 255, norm="Linf") -> Path:
    """What ``dist-robust eval`` writes: its config has init_from cleared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "dataset": "digits", "split": "test", "n": 50, "world_size": 1, "clean": {"correct": 40, "acc": 0.8},
        "attacks": {"pgd-20": _attack(0.4, eps, norm), "aa": _attack(0.3, eps, norm)},
        "checkpoint": str(checkpoint), "seconds": 1.0, "config": _config(norm=norm)}))
    return path


def _multi_radius(path: Path, checkpoint: Path) -> Path:
    radii = [{"eps": eps, "attacks": {"pgd-20": _attack(acc, eps)}} for eps, acc in ((0.05, 0.6), (0.1, 0.4),
                                                                                      (0.15, 0.2))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "digits", "split": "test", "n": 50, "world_size": 1,
                                "clean": {"correct": 45, "acc": 0.9}, "norm": "Linf", "radii": radii,
                                "checkpoint": str(checkpoint), "config": _config()}))
    return path


def _report(capsys, *args) -> tuple[int, list[str], list[str]]:
    rc = main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def _rows(out: list[str]) -> list[dict]:
    """The Markdown table as dicts of header -> cell."""
    table = [line for line in out if line.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]


def test_a_run_without_results_is_skipped_with_one_warning_and_the_others_still_shown(tmp_path, capsys):
    good = _training_run(tmp_path / "good")
    (tmp_path / "crashed").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    rc, out, err = _report(capsys, good, tmp_path / "crashed", tmp_path / "missing", tmp_path / "broken.json")
    assert rc == 0
    assert [r["run"] for r in _rows(out)] == ["good"]
    assert len(err) == 3 and all(line.startswith("dist-robust: warning: skipped ") for line in err), err
    assert "crashed" in err[0] and "missing" in err[1] and "broken.json" in err[2]
    assert not any("Traceback" in line for line in err)


def test_nothing_readable_exits_1_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out, err = _report(capsys, tmp_path / "empty")
    assert rc == 1 and out == []
    assert err[-1].startswith("dist-robust: error: nothing to report")


def test_a_folder_of_runs_is_searched_recursively_and_sorted(tmp_path, capsys):
    _training_run(tmp_path / "runs" / "b")
    _training_run(tmp_path / "runs" / "a")
    _training_run(tmp_path / "runs" / "pipe" / "stage2")
    _eval_file(tmp_path / "runs" / "a" / "eval-digits-test.json", tmp_path / "runs" / "a" / "model.json")
    rc, out, err = _report(capsys, tmp_path / "runs")
    assert rc == 0 and err == []
    assert [r["run"] for r in _rows(out)] == ["a/eval-digits-test.json", "a", "b", "stage2"]


def test_an_eval_file_is_labelled_with_what_it_evaluated(tmp_path, capsys):
    run = _training_run(tmp_path / "ft", init_from=str(tmp_path / "source_at"))
    scratch = _training_run(tmp_path / "scratch_run")
    _eval_file(run / "eval-digits-test.json", run / "model.json")
    _eval_file(tmp_path / "elsewhere" / "aa.json", run / "checkpoints" / "epoch_0002.json")
    _, out, _ = _report(capsys, run, scratch, run / "eval-digits-test.json", tmp_path / "elsewhere" / "aa.json")
    rows = _rows(out)
    assert [r["source"] for r in rows] == ["source_at", "scratch", "eval of ft", "eval of ft/epoch_0002"]
    assert [r["train s"] for r in rows] == ["6", "6", "-", "-"]  # three epochs of 2 s; evals did not train
    assert rows[2]["aa"] == "30.00" and rows[0]["aa"] == "-"


def test_the_eps_column_reads_k_over_255_and_a_norm_column_appears_when_norms_mix(tmp_path, capsys):
    linf = _training_run(tmp_path / "linf", eps=0.1)
    _eval_file(tmp_path / "e" / "eval-8.json", linf / "model.json", eps=8 / 255)
    _, out, _ = _report(capsys, linf, tmp_path / "e" / "eval-8.json")
    rows = _rows(out)
    assert [r["eps"] for r in rows] == ["0.1", "8/255"] and "norm" not in rows[0]
    l2 = _training_run(tmp_path / "l2", eps=0.5, norm="L2")
    _, out, _ = _report(capsys, linf, l2)
    assert [(r["norm"], r["eps"]) for r in _rows(out)] == [("Linf", "0.1"), ("L2", "0.5")]


@pytest.mark.parametrize("eps, text", [(8 / 255, "8/255"), (2 / 255, "2/255"), (0.1, "0.1"), (0.2, "0.2"),
                                       (1.0, "1"), (0.5, "0.5"), (0.0314, "0.0314"), (None, "-")])
def test_format_eps(eps, text):
    assert format_eps(eps) == text


def test_a_multi_radius_eval_gives_one_row_per_radius(tmp_path, capsys):
    f = _multi_radius(tmp_path / "run" / "eval-digits-test.json", tmp_path / "run" / "model.json")
    _, out, _ = _report(capsys, f)
    rows = _rows(out)
    assert [(r["eps"], r["clean"], r["pgd-20"]) for r in rows] == [
        ("0.05", "90.00", "60.00"), ("0.1", "90.00", "40.00"), ("0.15", "90.00", "20.00")]
    assert all(r["source"] == "eval of run" for r in rows)


def _comparison(path: Path) -> Path:
    """The structure of results/finetune.json: runs -> pair -> method -> seed -> row."""
    row = lambda c, r: {"clean": c, "pgd20": r, "n": 2000, "train_s": 10.0}
    runs = {pair: {"standard": {"0": row(0.8, 0.05), "1": row(0.78, 0.06)},
                   "at": {"0": row(0.7, 0.5), "1": row(0.71, 0.52)}, "aft": {"0": row(0.75, 0.56)}}
            for pair in ("fashion_to_animal", "mnist_to_fashion")}
    path.write_text(json.dumps({"command": "python scripts/finetune_results.py", "aa_limit": 100, "runs": runs}))
    return path


def _check_png(path: Path) -> None:
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300, pixels.shape
    assert pixels.std() > 0.01  # something was drawn


def test_plot_writes_valid_pngs(tmp_path, capsys):
    a, b = _training_run(tmp_path / "runs" / "a"), _training_run(tmp_path / "runs" / "b")
    multi = _multi_radius(tmp_path / "runs" / "a" / "eps.json", a / "model.json")
    comparison = _comparison(tmp_path / "finetune.json")
    rc, out, err = _report(capsys, "--plot", tmp_path / "plots", a, b, multi, comparison)
    assert rc == 0 and err == [], err
    names = ["curves.png", "eps.png", "scatter.png"]
    assert out[-3:] == [str(tmp_path / "plots" / n) for n in names]
    for n in names:
        _check_png(tmp_path / "plots" / n)


def test_plot_without_validation_lines_and_from_a_log_only_run(tmp_path, capsys):
    """A run still training (no results.json) and without val lines still gets its curves."""
    (tmp_path / "running").mkdir()
    _log(tmp_path / "running" / "log.jsonl", epochs=2, steps_per_epoch=10, val=False)
    rc, out, err = _report(capsys, "--plot", tmp_path / "plots", tmp_path / "running")
    assert rc == 0 and err == [] and out == [str(tmp_path / "plots" / "curves.png")]
    _check_png(tmp_path / "plots" / "curves.png")


def test_a_comparison_without_plot_is_skipped_and_plot_into_a_file_is_a_usage_error(tmp_path, capsys):
    comparison = _comparison(tmp_path / "finetune.json")
    rc, out, err = _report(capsys, comparison)
    assert rc == 1 and out == [] and "only --plot DIR draws it" in err[0]
    rc, out, err = _report(capsys, "--plot", comparison, comparison)
    assert rc == 2 and out == [] and err == [f"dist-robust: error: --plot={comparison}: not a folder"]
