"""``from dist_robust import evaluate_model``: a plain nn.Module defined here, evaluated in this process
and on 2 gloo ranks, gives the same counts; tensors work as a dataset; bad arguments fail in one line;
the README's example runs as written."""
import re

import pytest
import torch
from torch import nn

from conftest import ROOT, run_ranks

ATTACKS = ["clean", "pgd-5", "cw-3"]
LIMIT = 203  # not a multiple of the batch or of the ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(128, 10))


def _counts(results: dict) -> dict:
    return {"n": results["n"], "clean": results["clean"]["correct"],
            **{k: v["correct"] for k, v in results["attacks"].items()}}


def _on_ranks(rank, world, out):
    from dist_robust import evaluate_model
    counts = _counts(evaluate_model(_model(), "mnist", ATTACKS, eps="8/255", limit=LIMIT, batch_size=32))
    torch.save(counts, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def one_rank():
    from dist_robust import evaluate_model
    model = _model().train()
    results = evaluate_model(model, "mnist", ATTACKS, eps=8 / 255, limit=LIMIT, batch_size=32)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode and gradients restored
    return results


@pytest.mark.multiproc
def test_two_ranks_give_the_counts_of_one(one_rank, tmp_path):
    run_ranks(_on_ranks, 2, str(tmp_path))
    expected = _counts(one_rank)
    assert expected["n"] == LIMIT and 0 < expected["pgd-5"] < expected["clean"]
    for rank in range(2):  # every rank gets the totals
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected


def test_tensors_are_a_dataset(one_rank):
    from dist_robust import evaluate_model
    from dist_robust.data import load_dataset
    test = load_dataset("mnist", "test")
    images = test.images[:LIMIT].float() / 255  # float pixels, as a user holds them
    results = evaluate_model(_model(), (images, test.labels[:LIMIT]), ATTACKS, eps=8 / 255, batch_size=32)
    assert _counts(results) == _counts(one_rank)
    assert torch.equal(images, test.images[:LIMIT].float() / 255)  # the caller's tensor is not touched


@pytest.mark.parametrize("kwargs,names", [
    (dict(eps="8"), "eps='8'"),
    (dict(eps="8/x"), "eps='8/x'"),
    (dict(attacks=["pgd"]), "'pgd'"),
    (dict(norm="L1"), "norm='L1'"),
    (dict(dataset=(torch.rand(4, 1, 8, 8) * 2, torch.zeros(4))), "in [0, 1]"),
    (dict(dataset="no_such_data"), "no_such_data"),
])
def test_bad_arguments_fail_in_one_line(kwargs, names):
    from dist_robust import evaluate_model
    with pytest.raises((ValueError, KeyError)) as e:
        evaluate_model(_model(), **{"dataset": "mnist", **kwargs})
    assert names in str(e.value) and "\n" not in str(e.value)


@pytest.mark.multiproc
def test_the_readme_example_runs(tmp_path):
    """The README's Python example, as written (marked by an HTML comment before its code block)."""
    import subprocess
    import sys
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- example: checked by tests -->\s*```python\n(.*?)```", readme, re.S)
    assert code, "README.md has no marked Python example"
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("500 points: clean") and "'aa'" in r.stdout, r.stdout


def test_the_public_api_is_listed():
    import dist_robust
    assert set(dist_robust.__all__) == {"evaluate_model", "load_dataset", "load_model"}
    assert set(dist_robust.__all__) <= set(dir(dist_robust))
    assert all(callable(getattr(dist_robust, name)) for name in dist_robust.__all__)


def test_load_dataset_gives_the_caller_its_own_tensors():
    from dist_robust import load_dataset
    images, labels = load_dataset("digits", "test")
    assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 1 and labels.dtype == torch.int64
    images.zero_()  # the caller's to change: a second call is untouched
    again, _ = load_dataset("digits", "test")
    assert again.max() > 0


def test_load_model_gives_the_run_its_counts(reference):
    """The model of the shared reference run, loaded from its folder and evaluated from Python on the
    points its results.json counted, gives the same clean count."""
    import json

    from dist_robust import evaluate_model, load_dataset, load_model
    model = load_model(reference)
    assert not model.training
    recorded = json.loads((reference / "results.json").read_text())
    images, labels = load_dataset("digits", recorded["split"] if recorded["split"] != "val" else "train")
    results = evaluate_model(model, (images, labels), ["clean"], limit=recorded["n"], batch_size=64)
    assert results["clean"]["correct"] == recorded["clean"]["correct"]
