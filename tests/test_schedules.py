"""Learning-rate schedules: pure functions of the iteration, so a resumed run gets the right lr."""
import math

import pytest

from dist_robust.config import OptimConfig
from dist_robust.schedules import lr_at


def test_multistep_decays_at_fractional_epoch_milestones():
    o = OptimConfig(lr=0.1, schedule="multistep", milestones=[1.5, 3], gamma=0.1)
    spe = 10
    assert lr_at(0, spe, o, 4) == pytest.approx(0.1)
    assert lr_at(14, spe, o, 4) == pytest.approx(0.1)
    assert lr_at(15, spe, o, 4) == pytest.approx(0.01)
    assert lr_at(30, spe, o, 4) == pytest.approx(0.001)


def test_cosine_runs_from_lr_to_final_lr():
    o = OptimConfig(lr=0.2, schedule="cosine", final_lr=0.02)
    assert lr_at(0, 10, o, 5) == pytest.approx(0.2)
    assert lr_at(25, 10, o, 5) == pytest.approx(0.02 + 0.5 * 0.18 * (1 + math.cos(math.pi / 2)))
    assert lr_at(50, 10, o, 5) == pytest.approx(0.02)
    lrs = [lr_at(s, 10, o, 5) for s in range(50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_warmup_then_schedule():
    o = OptimConfig(lr=0.1, schedule="constant", warmup_epochs=0.5)
    lrs = [lr_at(s, 10, o, 2) for s in range(8)]
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # ramps to lr over 5 iterations
    assert lrs[5:] == pytest.approx([0.1] * 3)


@pytest.mark.parametrize("shape", ["linear", "cosine", "exp"])
def test_slow_start_fast_decay_hits_its_parameters_at_the_boundaries(shape):
    o = OptimConfig(lr=0.2, schedule="ssfd", warmup_frac=0.25, decay_frac=0.5, decay_shape=shape, final_lr=0.01)
    spe, epochs = 10, 4  # 40 iterations: ramp 0..10, hold 10..20, decay 20..40
    assert lr_at(0, spe, o, epochs) == pytest.approx(0.0)
    assert lr_at(5, spe, o, epochs) == pytest.approx(0.1)        # half-way up the linear ramp
    assert lr_at(10, spe, o, epochs) == pytest.approx(0.2)       # peak at the end of the warm-up
    assert lr_at(20, spe, o, epochs) == pytest.approx(0.2)       # still the peak where the decay starts
    assert lr_at(40, spe, o, epochs) == pytest.approx(0.01)      # final lr at the end
    decay = [lr_at(s, spe, o, epochs) for s in range(20, 41)]
    assert all(a > b for a, b in zip(decay, decay[1:]))           # strictly decreasing
    mid = lr_at(30, spe, o, epochs)
    expected = {"linear": 0.105, "cosine": 0.105, "exp": 0.01 + 0.19 * (math.exp(-2.5) - math.exp(-5)) / (1 - math.exp(-5))}
    assert mid == pytest.approx(expected[shape])
