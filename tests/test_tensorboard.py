"""The run's journal reaches TensorBoard (dist_robust/tensorboard.py) as it reaches log.jsonl, read back
with TensorBoard's own reader; and the epoch's images/s after a mid-epoch resume counts only the images
that process trained."""
import json
import sys

import pytest

from conftest import QUICKSTART, TINY, Stop, die_at_step
from dist_robust import tensorboard as journal_module
from dist_robust.cli import main
from dist_robust.report import train_seconds
from dist_robust.tensorboard import RunLog


def _events(folder) -> dict:
    """tag -> [(step, value)] of the event files in ``folder``, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _records(run, kind) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def test_a_runs_steps_epochs_and_final_eval_are_in_its_event_file(tmp_path, capsys):
    assert main(["train", QUICKSTART, *TINY, f"run.out_dir={tmp_path}", "run.name=r"]) == 0
    assert "(1437 images, memory loader, 1 rank, 22 steps/epoch)" in capsys.readouterr().err
    run = tmp_path / "r"
    events = _events(run / "tb")
    assert {"train/loss", "train/lr", "train/images_per_s", "train/attack_success", "epoch/loss",
            "epoch/train_acc", "epoch/lr", "epoch/images_per_s", "epoch/attack_success", "eval/clean",
            "eval/pgd-3"} <= events.keys()
    steps = _records(run, "step")
    # Every train.log_every=5 optimizer steps, the loss log.jsonl holds (TensorBoard keeps float32).
    assert [s for s, _ in events["train/loss"]] == [r["step"] for r in steps] == [5, 10, 15, 20]
    assert [v for _, v in events["train/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert all(0 <= v <= 1 for _, v in events["train/attack_success"])
    (epoch,) = _records(run, "epoch")
    assert events["epoch/loss"] == [(22, pytest.approx(epoch["loss"], rel=1e-6))]
    results = json.loads((run / "results.json").read_text())
    assert events["eval/clean"] == [(22, pytest.approx(results["clean"]["acc"], rel=1e-6))]
    assert events["eval/pgd-3"] == [(22, pytest.approx(results["attacks"]["pgd-3"]["acc"], rel=1e-6))]


def test_validation_records_and_a_resume_that_relogs_steps(tmp_path):
    first = RunLog(tmp_path)
    for step in (1, 2, 3):
        first.write(kind="step", epoch=1, step=step, lr=0.1, loss=float(step))
        if step == 2:
            first.write(kind="val", epoch=1, step=2, n=10, clean={"correct": 9, "acc": 0.9},
                        attacks={"pgd-10": {"correct": 4, "acc": 0.4}})
    first.close()
    # A process resumed from step 2's checkpoint trains and logs step 3 again: TensorBoard shows its own.
    with RunLog(tmp_path, step=2) as resumed:
        resumed.write(kind="step", epoch=1, step=3, lr=0.1, loss=30.0)
    events = _events(tmp_path / "tb")
    assert events["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert events["val/clean"] == [(2, pytest.approx(0.9))] and events["val/pgd-10"] == [(2, pytest.approx(0.4))]
    assert len(_records(tmp_path, "step")) == 4  # log.jsonl keeps every record, as written


def test_other_ranks_write_nothing_and_no_tensorboard_is_a_warning(tmp_path, monkeypatch):
    RunLog(None).write(kind="step", step=1, loss=1.0)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    warned = []
    monkeypatch.setattr(journal_module.log, "warning", lambda msg, *args: warned.append(msg % args))
    with RunLog(tmp_path) as journal:
        journal.write(kind="step", epoch=1, step=1, lr=0.1, loss=1.0)
    assert len(warned) == 1 and "no TensorBoard event files" in warned[0]
    assert len(_records(tmp_path, "step")) == 1 and not (tmp_path / "tb").exists()


def test_a_resumed_epochs_images_per_s_counts_the_images_trained_after_the_resume(tmp_path, monkeypatch):
    # 10 steps of 64 images; stopped at step 8, the run resumes from step 6's checkpoint: 4 steps remain.
    args = ["train", QUICKSTART, *TINY, "data.subset=640", "train.checkpoint_every=3", "train.log_every=1",
            "eval.at_end=false", f"run.out_dir={tmp_path}", "run.name=r"]
    die_at_step(monkeypatch, 8)
    with pytest.raises(Stop):
        main(args)
    monkeypatch.undo()
    assert main(args) == 0
    run = tmp_path / "r"
    (epoch,) = _records(run, "epoch")
    assert epoch["images_per_s"] * epoch["seconds"] == pytest.approx(4 * 64)
    # loss and accuracy stay the whole epoch's: the same as the steps' mean (each a batch of 64)
    steps = {r["step"]: r["loss"] for r in _records(run, "step")}  # the last record of a step wins
    assert sorted(steps) == list(range(1, 11)) and epoch["loss"] == pytest.approx(sum(steps.values()) / 10)
    assert [s for s, _ in _events(run / "tb")["train/loss"]] == list(range(1, 11))
    # report's train time counts both processes: the epoch record times the 4 steps after the resume,
    # the first process's wall times in the log its 6 steps up to the checkpoint (not its 2 redone ones)
    resume, first = _records(run, "resume")[0], min(_records(run, "step"), key=lambda r: r["time"])
    before = train_seconds(run) - epoch["seconds"]
    assert 0 < before < resume["time"] - (first["time"] - first["relative_time"])
