"""TWINS: the frozen wing never moves, the adaptive wing does, the export is the adaptive model, and
2 ranks (DDP + synchronised adaptive wing) train in lockstep."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import run_cases
from dist_robust import config
from dist_robust.checkpoint import save_checkpoint
from dist_robust.data import load_dataset
from dist_robust.methods import build_method
from dist_robust.models import build_model
from dist_robust.models.dual_bn import DualBatchNorm2d, bn_branch, dual_layers, export_plain
from dist_robust.models.partial import configure_finetuning
from dist_robust.models.sync_bn import SyncBatchNorm2d, convert_sync_bn
from dist_robust.preflight import preflight

RECIPE = ["data.name=digits", "model.name=cnn3", "attack.eps=0.1", "attack.steps=2", "optim.lr=0.05"]


def _source():
    """A cnn3 whose BN statistics are not the initial 0/1 (a few clean training steps on digits)."""
    ds = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("cnn3", 1, 10, ds.info.mean, ds.info.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        x, y = ds.images[i * 32:(i + 1) * 32].float() / 255, ds.labels[i * 32:(i + 1) * 32]
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def _source_checkpoint(folder) -> str:
    """``_source()`` saved as a run exports it: a TWINS config needs model.init_from."""
    save_checkpoint(folder, "model", _source().state_dict(), dict(config={"model": {"name": "cnn3"}}, epoch=1, step=1))
    return str(folder)


def _batch(start, n):
    ds = load_dataset("digits", "train")
    return ds.images[start:start + n].float() / 255, ds.labels[start:start + n]


def _wing_stats(model, wing):
    return {n: b.clone() for n, b in model.named_buffers() if f".{wing}.running" in n}


@pytest.mark.parametrize("method", ["twins_at", "twins_trades"])
def test_frozen_wing_stays_bitwise_adaptive_wing_moves_export_matches(tmp_path, method):
    source = _source_checkpoint(tmp_path)
    cfg = config.load_config(None, RECIPE + [f"method.name={method}", f"model.init_from={source}"])
    model = configure_finetuning(_source(), tuned_bn="dual")
    layers = dual_layers(model)
    assert len(layers) == 3 and all(m.bn_branch == "adaptive" for m in layers)
    torch.testing.assert_close(layers[0].frozen.running_mean, layers[0].adaptive.running_mean, rtol=0, atol=0)
    frozen0, adaptive0 = _wing_stats(model, "frozen"), _wing_stats(model, "adaptive")
    frozen_w0 = layers[0].frozen.weight.detach().clone()
    m = build_method(cfg)
    model = m.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(3):
        x, y = _batch(100 + 32 * step, 32)
        loss, _ = m.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, value in _wing_stats(model, "frozen").items():
        assert torch.equal(value, frozen0[name]), f"frozen wing statistic {name} changed"
    assert all(not torch.equal(v, adaptive0[n]) for n, v in _wing_stats(model, "adaptive").items())
    assert not torch.equal(layers[0].frozen.weight, frozen_w0), "the frozen wing's affine must train"
    assert all(m.bn_branch == "adaptive" for m in layers), "the split must not outlive the training forward"

    plain = export_plain(model).eval()
    assert plain.state_dict().keys() == build_model("cnn3", 1, 10, [0.5], [0.5]).state_dict().keys()
    model.eval()
    x, _ = _batch(1000, 64)
    with torch.no_grad(), bn_branch(model, "adaptive"):
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_split_sends_first_half_to_the_frozen_wing_and_rejects_odd_batches():
    model = configure_finetuning(_source(), tuned_bn="dual").train()
    x, _ = _batch(0, 8)
    with torch.no_grad():
        with bn_branch(model, "frozen"):
            frozen = model(x[:4])
        with bn_branch(model, "adaptive"):
            adaptive = model(x[4:])
        with bn_branch(model, "split"):
            both = model(x)
    torch.testing.assert_close(both, torch.cat([frozen, adaptive]))
    with bn_branch(model, "split"), pytest.raises(ValueError, match="even local batch"):
        model(x[:7])


def test_odd_per_rank_batch_is_a_config_error():
    with pytest.raises(config.ConfigError, match="per-rank batch \\(33\\) must be even"):
        preflight([config.load_config(None, RECIPE + ["method.name=twins_at", "data.batch_size=66"], training=False)],
                  world_size=2)
    with pytest.raises(config.ConfigError, match="model.tuned_bn"):
        config.load_config(None, RECIPE + ["method.name=pgd_at", "model.tuned_bn=dual"])
    with pytest.raises(config.ConfigError, match="model.tuned_bn"):
        config.load_config(None, RECIPE + ["method.name=twins_at", "model.tuned_bn=train"])


def _twins_ddp_worker(rank, world, method, source):
    overrides = [f"method.name={method}", "model.sync_bn=true", f"model.init_from={source}"]
    cfg = config.load_config(None, RECIPE + overrides)
    model = configure_finetuning(convert_sync_bn(_source()), tuned_bn="dual")
    assert all(isinstance(m.adaptive, SyncBatchNorm2d) and not isinstance(m.frozen, torch.nn.BatchNorm2d)
               for m in model.modules() if isinstance(m, DualBatchNorm2d))
    m = build_method(cfg)
    model = m.prepare(model)
    frozen0 = _wing_stats(model, "frozen")
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(2):
        x, y = _batch(200 + 64 * step + 32 * rank, 32)  # each rank its own data
        loss, _ = m.loss(ddp, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
    gathered = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(gathered, state)
    assert torch.equal(gathered[0], gathered[1]), "parameters or BN statistics differ across ranks"
    assert all(torch.equal(v, frozen0[n]) for n, v in _wing_stats(model, "frozen").items())


@pytest.fixture(scope="module")
def lockstep_outcomes(tmp_path_factory):
    """Both TWINS methods in one 2-rank group."""
    out = tmp_path_factory.mktemp("twins_ddp")
    source = _source_checkpoint(out / "source")
    return run_cases(_twins_ddp_worker, 2, {m: (m, source) for m in ("twins_at", "twins_trades")}, out)


@pytest.mark.multiproc
@pytest.mark.parametrize("method", ["twins_at", "twins_trades"])
def test_twins_on_two_ranks_stays_in_lockstep(lockstep_outcomes, method):
    assert lockstep_outcomes[method] == ["ok", "ok"]
