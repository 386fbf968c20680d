"""Every metric a method returns is summed over ranks and logged per image (engine/train.py)."""
import json

import pytest
import torch

from conftest import run_ranks
from dist_robust.engine.train import epoch_summary

RANK_TOTALS = [  # what two ranks summed over an epoch: the base three and a method's own two
    {"loss_sum": 3.0, "correct": 5.0, "n": 8.0, "feature_dist_sum": 0.8, "clean_correct": 6.0},
    {"loss_sum": 1.0, "correct": 3.0, "n": 8.0, "feature_dist_sum": 0.4, "clean_correct": 2.0},
]


def _summary_worker(rank, world, out):
    totals = {k: torch.tensor(v, dtype=torch.float64) for k, v in RANK_TOTALS[rank].items()}
    summary = epoch_summary(totals, 2.0, epoch=1)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(summary, f)


@pytest.mark.multiproc
def test_a_methods_own_metrics_are_summed_over_ranks_and_divided_by_the_images(tmp_path):
    run_ranks(_summary_worker, 2, str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = {"epoch": 1, "loss": 4.0 / 16, "train_acc": 8.0 / 16, "clean_correct": 8.0 / 16,
                "feature_dist": (0.8 + 0.4) / 16, "seconds": 2.0, "images_per_s": 8.0}
    assert summary.keys() == expected.keys()
    assert all(abs(summary[k] - v) < 1e-12 for k, v in expected.items()), summary


def test_the_epoch_log_holds_them(tmp_path, tiny):
    """CARTL's feature distance and clean accuracy reach log.jsonl and the epoch line."""
    from dist_robust.cli import main
    args = ["train", "configs/quickstart.yaml", *[o for o in tiny if not o.startswith("method.")],
            "method.name=cartl", "data.subset=64", "data.batch_size=32", "eval.at_end=false",
            f"run.out_dir={tmp_path}", "run.name=cartl"]
    assert main(args) == 0
    epochs = [json.loads(line) for line in (tmp_path / "cartl" / "log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs and {"feature_dist", "clean_correct"} <= set(epochs[-1])
    assert epochs[-1]["feature_dist"] > 0


def test_images_per_s_counts_only_the_images_this_process_trained():
    """After a mid-epoch resume the totals hold the whole epoch (n=8) but this process trained 3 of
    its images in the 2 s: the rate is 3 / 2, the averages stay the whole epoch's."""
    totals = {k: torch.tensor(v, dtype=torch.float64) for k, v in RANK_TOTALS[0].items()}
    summary = epoch_summary(totals, 2.0, 3.0, epoch=1)
    assert summary["images_per_s"] == 1.5
    assert (summary["loss"], summary["train_acc"]) == (3.0 / 8, 5.0 / 8)
