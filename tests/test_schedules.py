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
