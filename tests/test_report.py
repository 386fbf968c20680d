"""``dist-robust report``: the table over run folders, folders of runs and eval files, and --plot's PNGs.
Every file is written by hand in the formats training and ``dist-robust eval`` write."""
import json
from pathlib import Path

import pytest

from dist_robust.cli import main
from dist_robust.report import format_eps, train_seconds


def _attack(acc, eps=0.1, norm="Linf"):
    return {"correct": round(acc * 100), "acc": acc, "eps": eps, "norm": norm, "steps": 20, "loss": "ce"}


def _config(method="pgd_at", init_from=None, norm="Linf", model="cnn3"):
    return {"method": {"name": method}, "model": {"name": model, "init_from": init_from},
            "attack": {"eps": 0.1, "norm": norm}, "eval": {"eps": None, "norm": None}}


def _training_run(folder: Path, clean=0.9, robust=0.5, eps=0.1, norm="Linf", init_from=None, log=True,
                  model="cnn3") -> Path:
    """A finished training run: results.json naming its own model.json, and a log.jsonl."""
    folder.mkdir(parents=True)
    results = {"dataset": "digits", "split": "test", "n": 100, "world_size": 1,
               "clean": {"correct": round(clean * 100), "acc": clean},
               "attacks": {"pgd-20": _attack(robust, eps, norm)}, "checkpoint": str(folder / "model.json"),
               "seconds": 1.0, "config": _config(init_from=init_from, norm=norm, model=model)}
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
    names = ["curves.png", "eps.png", "scatter.png", "clean_vs_robust.png"]
    assert out[-4:] == [str(tmp_path / "plots" / n) for n in names]
    for n in names:
        _check_png(tmp_path / "plots" / n)


def test_plot_without_validation_lines_and_from_a_log_only_run(tmp_path, capsys):
    """A run still training (no results.json) and without val lines still gets its curves."""
    (tmp_path / "running").mkdir()
    _log(tmp_path / "running" / "log.jsonl", epochs=2, steps_per_epoch=10, val=False)
    rc, out, err = _report(capsys, "--plot", tmp_path / "plots", tmp_path / "running")
    assert rc == 0 and out == [str(tmp_path / "plots" / "curves.png")]
    assert err == [f"dist-robust: warning: skipped {tmp_path / 'running'}: unfinished (no results.json; "
                   "2 epochs logged): not in the table"]
    _check_png(tmp_path / "plots" / "curves.png")


def test_a_comparison_without_plot_is_skipped_and_plot_into_a_file_is_a_usage_error(tmp_path, capsys):
    comparison = _comparison(tmp_path / "finetune.json")
    rc, out, err = _report(capsys, comparison)
    assert rc == 1 and out == [] and "only --plot DIR draws it" in err[0]
    rc, out, err = _report(capsys, "--plot", comparison, comparison)
    assert rc == 2 and out == [] and err == [f"dist-robust: error: --plot={comparison}: not a folder"]


def test_the_table_names_each_rows_model(tmp_path, capsys):
    cnn = _training_run(tmp_path / "cnn")
    vit = _training_run(tmp_path / "vit", model="timm:vit_tiny_patch16_224")
    _eval_file(tmp_path / "e" / "eval.json", cnn / "model.json")
    _, out, _ = _report(capsys, cnn, vit, tmp_path / "e" / "eval.json")
    assert out[0].startswith("| run | model | source | method |")
    assert [r["model"] for r in _rows(out)] == ["cnn3", "timm:vit_tiny_patch16_224", "cnn3"]


def _resumed_log(path: Path, checkpoint_step: int) -> None:
    """Epochs of 10 steps, a step record every 5. Process 1 (log started at t=1000) finished epoch 1 in
    10 s, validated until 1012, logged step 15 at 1016 and was killed after its checkpoint at
    ``checkpoint_step``; the steps it logged after that were dropped by the resume. Process 2 resumed
    at 2000 and finished epoch 2 in 4 s. A step record of another epoch is not counted."""
    rec = lambda t, kind, **kw: dict(time=t, relative_time=t - (1000 if t < 2000 else 2000), kind=kind, **kw)
    lines = [rec(1005, "step", epoch=1, step=5), rec(1010, "step", epoch=1, step=10),
             rec(1010, "epoch", epoch=1, step=10, seconds=10.0), rec(1012, "val", epoch=1, step=10),
             rec(1016, "step", epoch=2, step=15),
             rec(2000, "resume", epoch=2, step=checkpoint_step, batch=checkpoint_step - 10),
             rec(2004, "step", epoch=2, step=20), rec(2004, "epoch", epoch=2, step=20, seconds=4.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.mark.parametrize("checkpoint_step, before", [(15, 4.0), (17, 4.0 * 7 / 5)])
def test_a_resumed_runs_train_time_counts_every_process_once(tmp_path, checkpoint_step, before):
    """The earlier process's part of the resumed epoch: from its val record (1012) to its last step
    (1016), carried on at that pace to the checkpoint's step when that was not a logged one."""
    _resumed_log(tmp_path / "log.jsonl", checkpoint_step)
    assert train_seconds(tmp_path) == pytest.approx(10.0 + 4.0 + before)


def test_a_resume_in_a_resumed_epoch_counts_from_its_own_marker(tmp_path):
    """Three processes in epoch 2: the second one's part starts at its resume marker, not earlier."""
    rec = lambda t, kind, **kw: dict(time=t, relative_time=0.0, kind=kind, **kw)
    lines = [rec(1010, "epoch", epoch=1, step=10, seconds=10.0), rec(1013, "step", epoch=2, step=12),
             rec(2000, "resume", epoch=2, step=12, batch=2), rec(2003, "step", epoch=2, step=15),
             rec(3000, "resume", epoch=2, step=15, batch=5), rec(3005, "epoch", epoch=2, step=20, seconds=5.0)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert train_seconds(tmp_path) == pytest.approx(10.0 + 3.0 + 3.0 + 5.0)


def test_every_run_left_out_of_the_table_gets_one_warning(tmp_path, capsys):
    runs = tmp_path / "runs"
    _training_run(runs / "done")
    (runs / "killed").mkdir(parents=True)
    _log(runs / "killed" / "log.jsonl", epochs=3, steps_per_epoch=10, val=False)
    (runs / "killed" / "config.yaml").write_text("train:\n  epochs: 10\n")
    (runs / "not_evaluated").mkdir()
    _log(runs / "not_evaluated" / "log.jsonl", epochs=2, steps_per_epoch=10, val=False)
    (runs / "not_evaluated" / "model.json").write_text("{}")
    rc, out, err = _report(capsys, runs)
    assert rc == 0 and [r["run"] for r in _rows(out)] == ["done"]
    assert err == [f"dist-robust: warning: skipped {runs / 'killed'}: unfinished (no results.json; 3 of 10 "
                   "epochs logged): not in the table",
                   f"dist-robust: warning: skipped {runs / 'not_evaluated'}: trained but not evaluated (no "
                   f"results.json; dist-robust eval --checkpoint {runs / 'not_evaluated'} evaluates it): not in "
                   "the table"]
    rc, out, err = _report(capsys, runs / "killed")  # given alone, without --plot: nothing else to show
    assert rc == 1 and len(err) == 2 and "3 of 10 epochs logged" in err[0]


def test_the_curves_legend_covers_no_axis_label(tmp_path):
    """Six runs with validation lines: the legend of the runs (and its title) clear of every panel's
    labels and tick labels."""
    from dist_robust.plots import curves_figure
    runs = []
    for i in range(6):
        runs.append(tmp_path / f"a_fairly_long_run_name_{i}")
        runs[-1].mkdir()
        _log(runs[-1] / "log.jsonl", epochs=3, steps_per_epoch=10, val=True)
    fig = curves_figure(runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert fig.legends[0].get_title().get_text() == "run"
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_tightbbox(renderer)), ax.get_title()


def test_clean_vs_robust_has_one_point_per_run(tmp_path, capsys):
    from dist_robust.plots import clean_robust_figure
    from dist_robust.report import collect
    a = _training_run(tmp_path / "a", clean=0.9, robust=0.5)
    b = _training_run(tmp_path / "b", clean=0.8, robust=0.6)
    ev = _eval_file(tmp_path / "e" / "eval.json", a / "model.json")  # pgd-20 40%, aa 30%
    fig = clean_robust_figure(collect([str(a), str(b), str(ev)]).results)
    ax = fig.axes[0]
    assert ax.collections[0].get_offsets().flatten().tolist() == pytest.approx([90, 50, 80, 60, 80, 40])
    assert [t.get_text() for t in ax.texts] == ["a", "b", "e/eval.json"]
    assert ax.get_ylabel() == "robust accuracy (pgd-20)"  # the attack every run has
    rc, out, err = _report(capsys, "--plot", tmp_path / "plots", a)  # a single run gets its point too
    assert rc == 0 and str(tmp_path / "plots" / "clean_vs_robust.png") in out
    _check_png(tmp_path / "plots" / "clean_vs_robust.png")
