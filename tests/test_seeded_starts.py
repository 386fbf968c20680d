"""The evaluator's seeded random starts (evaluate._seeded_starts), made with one host-to-device copy per
batch, are bitwise the starts of the per-point construction they replaced (one generator reseeded and
one copy to x's device per point), kept here as the reference with the random start it called."""
import pytest
import torch

from dist_robust.evaluate import _seeded_starts


def _reference_random_start(x, eps, norm, generator):  # attacks.steps.random_start as it was, with a generator
    if norm == "Linf":
        delta = torch.rand(x.shape, generator=generator, device="cpu") * 2 - 1
        delta = delta * eps
    else:
        delta = torch.randn(x.shape, generator=generator, device="cpu")
        radius = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device="cpu")
        norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.dim() - 1))
        delta = delta / norms.clamp_min(1e-12) * radius * eps
    return delta.to(x.device, x.dtype)


def _reference_starts(x, first_index, seed, restart, eps, norm):  # the per-point construction it replaced
    g = torch.Generator()
    starts = []
    for i in range(len(x)):
        g.manual_seed((seed * 1_000_003 + restart) * 1_000_000_007 + first_index + i)
        starts.append(_reference_random_start(x[i:i + 1], eps, norm, generator=g))
    return torch.cat(starts)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("Linf", 8 / 255), ("L2", 0.5), ("L2", 2.0)])
@pytest.mark.parametrize("shape,dtype", [((7, 1, 28, 28), torch.float32), ((3, 3, 32, 32), torch.float32),
                                         ((4, 3, 7, 5), torch.float64), ((5, 2, 9, 9), torch.bfloat16),
                                         ((6, 10), torch.float32), ((1, 1, 8, 8), torch.float32)])
@pytest.mark.parametrize("first_index,seed,restart", [(0, 0, 0), (1234, 3, 2)])
def test_the_batched_starts_are_the_per_point_ones_bitwise(norm, eps, shape, dtype, first_index, seed, restart):
    x = torch.rand(shape).to(dtype)
    got = _seeded_starts(x, first_index, seed, restart, eps, norm)
    want = _reference_starts(x, first_index, seed, restart, eps, norm)
    assert got.dtype == want.dtype == dtype and got.device == x.device and got.shape == x.shape
    assert torch.equal(got, want)


def test_a_points_start_depends_on_its_global_index_only():
    x = torch.rand(6, 1, 8, 8)
    whole = _seeded_starts(x, 10, 0, 0, 0.1, "L2")
    assert torch.equal(whole[2:], _seeded_starts(x[2:], 12, 0, 0, 0.1, "L2"))
