"""AutoAttack on fra31's code (attacks/autoattack.py): with one block on one rank our robust flags are
pyautoattack's ``run_standard_evaluation``'s, point by point; the cascade is at least as strong as PGD,
counts exactly the same on 1 and 2 ranks (also with an idle rank), stays within a point of the
reference with several blocks, resumes after a kill, ignores stale state, never accepts an output
outside the eps ball or the [0, 1] box, and runs the reference's plus and rand versions.

A tiny cnn3 (width 4) trained for about a second on digits: at eps 0.015 most of its test points fall
to APGD-CE but about a quarter survive, so every later attack attacks real points. The cascades run
with the reference's budgets cut alike on both sides (BUDGETS: 25 iterations, 500 Square queries; on
one machine APGD-CE, APGD-T and FAB-T each decide points): the wiring, seeds and batches are under
test, the full budgets are checked as settings, and bench/autoattack.py compares full cascades.
"""
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from safetensors.torch import load_file, save_file

from conftest import START_METHOD, run_ranks
from dist_robust.attacks import autoattack as aa_mod
from dist_robust.attacks import pgd
from dist_robust.attacks.autoattack import attacks_of, autoattack, settings, within_bounds
from dist_robust.data import load_dataset
from dist_robust.evaluate import evaluate
from dist_robust.models import build_model

N, EPS, BLOCK = 120, 0.015, 60  # 2 blocks, one per rank (the uneven splits are tested with cheap noise)
BUDGETS = dict(n_iter=25, n_queries=500)  # a full cascade here: about 5 s on one thread, not 19
AA_STANDARD = attacks_of("standard")
L2_EPS = 0.15  # PGD-20 leaves ~9 of the 15 clean-correct L2 points (at 0.5 APGD-CE took all on one machine)
COUNTS = ("attacked", "robust", "rejected")


def _fresh_model():
    info = load_dataset("digits", "test").info
    return build_model("cnn3", 1, 10, info.mean, info.std, width=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model in eval mode, test set, path of its weights for the rank workers)."""
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    model = _fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = train.images.float() / 255, train.labels
    for _ in range(15):
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("aa") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, load_dataset("digits", "test"), str(path)


def _one_thread(fn):
    """Run fn with torch on 1 thread, as the rank workers run: same arithmetic, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _load(weights):
    model = _fresh_model()
    model.load_state_dict(load_file(weights))
    return model.eval(), load_dataset("digits", "test")


def _recording(adversary, outputs: list):
    """``adversary`` (fra31's AutoAttack) with each of its attack objects appending what it returns to
    ``outputs``: the adversarial images themselves, which a wrong seed or target changes even where
    the robust flags happen to stay the same."""
    for attr in ("apgd", "apgd_targeted", "fab", "square"):
        def perturb(*args, _real=getattr(adversary, attr).perturb, **kwargs):  # noqa: B008 (bound per attr)
            out = _real(*args, **kwargs)
            outputs.append(out.detach().clone())
            return out
        getattr(adversary, attr).perturb = perturb
    return adversary


def _job_reference(weights):
    """fra31's AutoAttack, as RobustBench runs it, on the first N points: (its robust flags per point,
    every adversarial batch its attacks returned)."""
    model, test = _load(weights)
    x, y = test.images[:N].float() / 255, test.labels[:N]
    outputs = []
    adversary = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device="cpu")
    _, y_adv = _recording(_cut(adversary, **BUDGETS), outputs).run_standard_evaluation(x, y, batch_size=N)
    return y_adv == y, outputs  # the label it ends on: the clean one for a robust point, a wrong one otherwise


def _job_one_block(weights, state_dir):
    """Ours with one block of all N points and the reference's batch size: (result, per-point flags,
    every adversarial batch the attacks returned)."""
    model, test = _load(weights)
    build, outputs = aa_mod.build_attack, []

    def recording_build(*args, **kwargs):
        atk = build(*args, **kwargs)
        _recording(atk.adversary, outputs)
        return atk
    aa_mod.build_attack = recording_build
    res = autoattack(model, test, EPS, limit=N, block_size=N, batch_size=N, state_dir=state_dir)
    return res, load_file(os.path.join(state_dir, "rank0.safetensors"))["after.square"].bool(), outputs


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"


def _job_stopped_and_resumed(weights, kw):
    """Ours in blocks of BLOCK, stopped after APGD-CE (as if killed there), then run again from its
    saved state: (the stopped run's result, the resumed one's, what the resume logged)."""
    model, test = _load(weights)
    first = autoattack(model, test, EPS, stop_after="apgd-ce", **kw)
    handler, logger = _Records(), logging.getLogger("dist_robust")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    resumed = autoattack(model, test, EPS, **kw)
    return first, resumed, handler.text


def _one_thread_job(job, *args):
    torch.set_num_threads(1)  # as the rank workers run: the same arithmetic, bit for bit
    _ours_with(**BUDGETS)
    return job(*args)


@pytest.fixture(scope="module")
def cascades(trained, tmp_path_factory):
    """The three single-process full cascades the tests compare, each on one thread, two at a time in
    two processes (the machine's two cores): fra31's reference, ours in one block, ours in blocks of
    BLOCK stopped and resumed."""
    weights = trained[2]
    tmp = tmp_path_factory.mktemp("aa_cascades")
    kw = dict(limit=N, block_size=BLOCK, batch_size=BLOCK, state_dir=tmp / "resumed", fingerprint="sha-of-model")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(START_METHOD)) as pool:
        jobs = {"resumed": pool.submit(_one_thread_job, _job_stopped_and_resumed, weights, kw),
                "reference": pool.submit(_one_thread_job, _job_reference, weights),
                "one_block": pool.submit(_one_thread_job, _job_one_block, weights, str(tmp / "one_block"))}
        out = {name: job.result() for name, job in jobs.items()}
    return {**out, "kw": kw}


@pytest.fixture(scope="module")
def reference_flags(cascades):
    return cascades["reference"][0]


@pytest.fixture(scope="module")
def ours(cascades):
    """The single-process result in blocks of BLOCK that the other tests compare with. It is the resumed
    run (one full cascade fewer for the suite): the two-rank test checks it against 2 uninterrupted
    ranks, so a resume that changed any count fails there as well as in the resume test."""
    return cascades["resumed"][1]


def _counts(res):
    return (res["clean"]["correct"], res["correct"],
            {a: tuple(r[k] for k in COUNTS) for a, r in res["per_attack"].items()})


@pytest.mark.multiproc  # its cascades run in two processes
def test_one_block_gives_the_reference_flags_point_by_point(cascades, reference_flags):
    """One block of all N points on one rank, the same seed and batch size (all N in one batch: each
    attack's cost is mostly per iteration, not per point): our chunk is the reference's batch and every
    attack call gets the reference's seed, so the flags, and every adversarial batch on the way, must be
    equal."""
    res, flags, outputs = cascades["one_block"]
    assert 0 < int(reference_flags.sum()) < res["clean"]["correct"]  # the attacks decide something
    assert torch.equal(flags, reference_flags), (flags != reference_flags).nonzero().flatten().tolist()
    assert res["correct"] == int(reference_flags.sum())
    reference_outputs = cascades["reference"][1]
    assert len(outputs) == len(reference_outputs) == len(AA_STANDARD)  # one batch per attack
    for name, ours_adv, ref_adv in zip(AA_STANDARD, outputs, reference_outputs):
        assert torch.equal(ours_adv, ref_adv), name


@pytest.mark.multiproc  # its cascades run in two processes
def test_cascade_runs_every_attack_beats_pgd_and_is_within_a_point_of_the_reference(trained, ours,
                                                                                    reference_flags):
    model, test, _ = trained
    x, y = test.images[:N].float() / 255, test.labels[:N]
    assert ours["n"] == N and ours["version"] == "standard" and tuple(ours["per_attack"]) == AA_STANDARD
    robust = [ours["clean"]["correct"]] + [ours["per_attack"][a]["robust"] for a in AA_STANDARD]
    assert robust == sorted(robust, reverse=True) and robust[1] < robust[0]  # APGD-CE does something
    for a in AA_STANDARD[1:]:  # ... and leaves points for the later attacks to really attack
        assert ours["per_attack"][a]["attacked"] > 0
    assert all(r["rejected"] == 0 for r in ours["per_attack"].values())
    assert ours["correct"] == ours["per_attack"]["square"]["robust"] and ours["acc"] == ours["correct"] / N

    x_pgd = pgd(model, x, y, EPS, 20)
    with torch.no_grad():  # PGD-20 with the per-sample worst case over clean and attacked
        pgd_robust = int(((model(x).argmax(1) == y) & (model(x_pgd).argmax(1) == y)).sum())
    assert ours["correct"] <= pgd_robust
    # 2 blocks instead of 1: the chunks hold other points, so APGD's and Square's random draws land on
    # other points and a point near the boundary may fall either way; at most one point either side
    assert abs(ours["correct"] - int(reference_flags.sum())) <= 1, (ours["correct"], int(reference_flags.sum()))


def test_settings_are_the_reference_standard_version():
    s = settings("standard", "Linf")
    assert list(s) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert s["apgd-ce"] == {"n_iter": 100, "n_restarts": 1, "eot_iter": 1, "rho": 0.75}
    assert s["apgd-t"] == {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9, "rho": 0.75}
    assert s["fab-t"] == {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9}
    assert s["square"] == {"n_queries": 5000, "p_init": 0.8, "resc_schedule": False}
    assert settings("standard", "L2") == s  # the reference's L2 standard has the same budgets
    assert settings("standard", "Linf", n_classes=5)["apgd-t"]["n_target_classes"] == 4
    plus, rand = settings("plus", "Linf"), settings("rand", "Linf")
    assert list(plus) == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert plus["apgd-ce"]["n_restarts"] == plus["fab"]["n_restarts"] == 5
    assert list(rand) == ["apgd-ce", "apgd-dlr"] and rand["apgd-ce"]["eot_iter"] == 20


def _cut(adversary, n_iter=3, n_queries=30):
    """fra31's AutoAttack object with its attacks' budgets cut (the wiring is under test, not the budgets)."""
    adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = n_iter
    adversary.square.n_queries = n_queries
    return adversary


def _cut_budgets(atk, **budgets):
    """One of our attacks (its library object is ``atk.adversary``) with the budgets cut."""
    _cut(atk.adversary, **budgets)
    return atk


def _ours_with(**budgets):
    """Every attack ours builds from now on, in this (spawned) process, runs with ``budgets``."""
    build = aa_mod.build_attack
    aa_mod.build_attack = lambda *a, **k: _cut_budgets(build(*a, **k), **budgets)


@pytest.fixture
def cut_budgets(monkeypatch):
    """BUDGETS for the cascades a test runs in the test process, as the spawned ones run."""
    build = aa_mod.build_attack
    monkeypatch.setattr(aa_mod, "build_attack", lambda *a, **k: _cut_budgets(build(*a, **k), **BUDGETS))


def test_plus_and_rand_versions_through_evaluate(trained, tmp_path, monkeypatch):
    """The versions are wired: names, attack lists, recorded budgets, one resumable state each. At eps
    0.3 APGD-CE fools every point, and the library attacks run 3 iterations (the recorded budgets stay
    the versions' own); the next test exercises every attack."""
    model, test, _ = trained
    build = aa_mod.build_attack
    monkeypatch.setattr(aa_mod, "build_attack", lambda *a, **k: _cut_budgets(build(*a, **k)))
    res = evaluate(model, test, ["clean", "aa", "aa-plus", "aa-rand"], 0.3, 8, torch.device("cpu"), limit=8,
                   aa_state_dir=tmp_path, aa_block_size=8)
    att = res["attacks"]
    assert [att[k]["version"] for k in ("aa", "aa-plus", "aa-rand")] == ["standard", "plus", "rand"]
    assert list(att["aa-plus"]["per_attack"]) == list(attacks_of("plus")) == list(att["aa-plus"]["steps"])
    assert list(att["aa-rand"]["per_attack"]) == ["apgd-ce", "apgd-dlr"]
    assert att["aa-rand"]["steps"]["apgd-ce"]["eot_iter"] == 20 and att["aa"]["backend"] == "pyautoattack 0.2.0"
    assert all(att[k]["correct"] <= res["clean"]["correct"] for k in att)
    assert {p.name for p in tmp_path.iterdir()} == {"rank0.safetensors", "aa-plus", "aa-rand"}  # one state each


def test_every_attack_of_plus_is_called_as_the_reference_calls_it(trained):
    """Each of the six attacks through our dispatch (budgets cut to a few iterations): the reference
    object is set as its run_standard_evaluation sets it, and the output stays in the ball and box."""
    model, test, _ = trained
    x, y = test.images[:4].float() / 255, test.labels[:4]
    for name in attacks_of("plus"):
        atk = _cut_budgets(aa_mod.build_attack(name, model, EPS, "Linf", 10, "plus"))
        ref = atk.adversary
        ref.apgd.n_restarts = ref.fab.n_restarts = ref.apgd_targeted.n_target_classes = ref.fab.n_target_classes = 2
        atk.seed = 0
        with torch.enable_grad():
            x_adv = atk(x, y)
        assert within_bounds(x, x_adv, EPS, "Linf").all(), name
        if name.startswith("apgd-") and name != "apgd-t":
            assert ref.apgd.loss == name.removeprefix("apgd-")
        if name.startswith("fab"):
            assert ref.fab.targeted == (name == "fab-t") and (name == "fab" or ref.fab.n_restarts == 1)
    with pytest.raises(ValueError, match="not an attack of AutoAttack 'standard'"):
        aa_mod.build_attack("apgd-dlr", model, EPS, "Linf", 10, "standard")


class _RandomSign:
    """A random-noise "attack" that seeds itself from its ``seed`` as the library attacks do: its
    success depends on every random draw, so equal flags mean equal seeds, block by block."""
    seed = None

    def __init__(self, eps):
        self.eps = eps

    def __call__(self, x, y):
        torch.manual_seed(self.seed)
        return (x + self.eps * torch.randn_like(x).sign()).clamp(0, 1)


def _noisy(model, test, state_dir):
    """Random-sign noise at eps 0.15 (fools about 1 point in 3) in blocks of 8; flags saved in state_dir."""
    build = aa_mod.build_attack
    aa_mod.build_attack = lambda name, net, eps, norm, *rest: _RandomSign(eps)
    try:
        return autoattack(model, test, 0.15, limit=N, block_size=8, batch_size=8, attacks=("square",),
                          state_dir=state_dir)
    finally:
        aa_mod.build_attack = build


def _rank_worker(rank, world, weights, out_dir, state_dir):
    _ours_with(**BUDGETS)
    model = _fresh_model()
    model.load_state_dict(load_file(weights))
    model.eval()
    test = load_dataset("digits", "test")
    full = autoattack(model, test, EPS, limit=N, block_size=BLOCK, batch_size=BLOCK)
    _noisy(model, test, os.path.join(out_dir, "noisy2"))
    # 12 points = one block: rank 1 holds nothing and must still join every collective
    idle = autoattack(model, test, EPS, limit=12, block_size=BLOCK, batch_size=BLOCK, attacks=AA_STANDARD[:2])
    # a rank that died before saving its state: every rank must roll back to what all of them finished
    two = AA_STANDARD[:2]
    first = autoattack(model, test, EPS, limit=40, block_size=8, batch_size=8, attacks=two, state_dir=state_dir,
                       stop_after="apgd-t")
    torch.distributed.barrier()
    if rank == 1:
        os.unlink(os.path.join(state_dir, "rank1.safetensors"))
    torch.distributed.barrier()
    again = autoattack(model, test, EPS, limit=40, block_size=8, batch_size=8, attacks=two, state_dir=state_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"full": full, "idle": idle, "first": first, "again": again}, f)


@pytest.fixture(scope="module")
def two_ranks(trained, tmp_path_factory):
    """What each of 2 ranks returned from _rank_worker, and the folder of their files."""
    _, _, weights = trained
    out = tmp_path_factory.mktemp("aa_ranks")
    run_ranks(_rank_worker, 2, weights, str(out), str(out / "state"))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)], out


@pytest.mark.multiproc
def test_two_ranks_count_exactly_what_one_process_counts(trained, ours, two_ranks, tmp_path, cut_budgets):
    model, test, weights = trained
    res, out = two_ranks
    assert res[0]["full"]["world_size"] == 2 and res[0]["full"]["n"] == N
    assert _counts(res[0]["full"]) == _counts(res[1]["full"]) == _counts(ours)
    # the same random draws for the same points: point by point, 15 blocks of 8 split 8 + 7 over the ranks
    _one_thread(lambda: _noisy(model, test, tmp_path / "noisy1"))
    one = load_file(str(tmp_path / "noisy1" / "rank0.safetensors"))["after.square"]
    two = [load_file(str(out / "noisy2" / f"rank{r}.safetensors"))["after.square"] for r in (0, 1)]
    assert (len(two[0]), len(two[1])) == (64, 56) and torch.equal(torch.cat(two), one)
    idle_one = _one_thread(lambda: autoattack(model, test, EPS, limit=12, block_size=BLOCK, batch_size=BLOCK,
                                              attacks=AA_STANDARD[:2]))
    assert _counts(res[0]["idle"]) == _counts(res[1]["idle"]) == _counts(idle_one)
    for r in res:
        assert r["again"]["resumed"] == []  # rank 1 lost its state, so rank 0 must not skip either
        assert _counts(r["again"]) == _counts(r["first"])


@pytest.mark.multiproc
def test_resume_after_a_kill_gives_the_uninterrupted_result(trained, cascades, two_ranks, caplog, cut_budgets):
    model, test, _ = trained
    (first, resumed, log_text), kw = cascades["resumed"], cascades["kw"]
    assert list(first["per_attack"]) == ["apgd-ce"] and first["stopped_after"] == "apgd-ce"
    assert (kw["state_dir"] / "rank0.safetensors").exists()
    assert "resuming after apgd-ce" in log_text
    assert resumed["resumed"] == ["apgd-ce"]
    assert resumed["per_attack"]["apgd-ce"]["resumed"] is True
    assert resumed["per_attack"]["apgd-ce"]["time_s"] == first["per_attack"]["apgd-ce"]["time_s"]  # recorded
    assert all(not resumed["per_attack"][a]["resumed"] for a in AA_STANDARD[1:])
    uninterrupted = two_ranks[0][0]["full"]  # the same blocks, never stopped (2 ranks count as 1: next test)
    assert _counts(resumed) == _counts(uninterrupted) and resumed["acc"] == uninterrupted["acc"]

    caplog.clear()  # another eps (or checkpoint): the saved state is stale, reported and not used
    with caplog.at_level(logging.WARNING, logger="dist_robust"):
        other = autoattack(model, test, 2 * EPS, stop_after="apgd-ce", **kw)
    assert other["resumed"] == [] and not other["per_attack"]["apgd-ce"]["resumed"]
    assert "stale state" in caplog.text
    with caplog.at_level(logging.WARNING, logger="dist_robust"):
        autoattack(model, test, 2 * EPS, stop_after="apgd-ce", **dict(kw, fingerprint="another model"))
    assert caplog.text.count("stale state") == 2


def test_the_checker_rejects_outputs_outside_the_ball_or_the_box():
    x = torch.full((6, 1, 2, 2), 0.5)
    adv = x.clone()
    adv[1, 0, 0, 0] += 0.1 + 1e-7                     # at eps, within float slack: accepted
    adv[2, 0, 0, 0] += 0.1 + 1e-4                     # outside the L-inf ball
    adv[3] = 1.0                                      # in the box, but 0.5 from x
    adv[4, 0, 0, 0] = float("nan")                    # NaN fails everything
    adv[5, 0, 1, 1] = 0.5 + 0.05                      # fine
    assert within_bounds(x, adv, 0.1, "Linf").tolist() == [True, True, False, False, False, True]
    edge = torch.zeros(2, 1, 2, 2)
    out = edge.clone()
    out[0, 0, 0, 0] = 0.05
    out[1, 0, 0, 0] = -0.05                           # in the ball, out of the box
    assert within_bounds(edge, out, 0.1, "Linf").tolist() == [True, False]
    l2 = x.clone()
    l2[0] += 0.25                                     # L2 norm 0.5: on the sphere of radius 0.5
    l2[1] += 0.26                                     # norm 0.52
    assert within_bounds(x, l2, 0.5, "L2").tolist()[:2] == [True, False]


class _Cheater:
    """Returns 1 - x (an inverted image, far outside any small ball) for even positions, x for odd."""
    seed = 0

    def __call__(self, x, y):
        out = x.clone()
        out[::2] = 1 - x[::2]
        return out


def test_outputs_outside_the_ball_count_as_failed_attacks(trained, monkeypatch, caplog):
    model, test, _ = trained
    x, y = test.images[:N].float() / 255, test.labels[:N]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        assert (model(1 - x).argmax(1) != y).any()  # the crafted outputs would fool the model
    monkeypatch.setattr(aa_mod, "build_attack", lambda *a, **k: _Cheater())
    with caplog.at_level(logging.WARNING, logger="dist_robust"):
        res = autoattack(model, test, EPS, limit=N, block_size=BLOCK, batch_size=BLOCK, attacks=("apgd-ce",))
    attacked = [int(c.sum()) for c in clean.split(BLOCK)]
    assert res["per_attack"]["apgd-ce"]["rejected"] == sum((a + 1) // 2 for a in attacked)
    assert res["correct"] == res["clean"]["correct"] == int(clean.sum())  # nothing accepted
    assert "outside the eps ball" in caplog.text


def test_l2_cascade_in_bounds_and_model_state_restored(trained, cut_budgets):
    model, test, _ = trained
    model.train()  # attack_mode must put BN in eval mode and give the model back as it was
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        res = autoattack(model, test, L2_EPS, norm="L2", limit=20, block_size=BLOCK, batch_size=BLOCK,
                         attacks=("apgd-ce", "apgd-t", "fab-t"))
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    finally:
        model.eval()
    x, y = test.images[:20].float() / 255, test.labels[:20]
    x_pgd = pgd(model, x, y, L2_EPS, 20, norm="L2")
    with torch.no_grad():
        pgd_robust = int(((model(x).argmax(1) == y) & (model(x_pgd).argmax(1) == y)).sum())
    assert res["norm"] == "L2" and res["version"] == "standard:apgd-ce+apgd-t+fab-t"
    assert all(r["rejected"] == 0 for r in res["per_attack"].values())
    assert res["correct"] <= min(pgd_robust, res["clean"]["correct"])
    assert res["per_attack"]["apgd-t"]["attacked"] > 0


def test_default_blocks_give_every_rank_work_and_never_follow_the_ranks():
    """The default block is a function of the points alone (the counts depend on the block size, so it
    must not follow the ranks), and fewer points than the old default block of 500 per rank still give
    every rank of up to 8 blocks; a size that leaves ranks idle is said in one line."""
    import inspect

    from dist_robust.api import evaluate_model
    from dist_robust.attacks.autoattack import auto_block_size, idle_note, rank_blocks
    from dist_robust.config import EvalConfig
    for n in (57, 100, 203, 500, 1000, 3999):
        for world in (2, 3, 4, 8):
            assert all(len(rank_blocks(n, auto_block_size(n), r, world)) for r in range(world)), (n, world)
            assert idle_note(n, auto_block_size(n), world) is None
    assert auto_block_size(100) == 13 and auto_block_size(10_000) == 500 and auto_block_size(3) == 1
    for fn in (autoattack, evaluate, evaluate_model):  # every layer leaves the choice to auto_block_size
        params = inspect.signature(fn).parameters
        assert params["block_size" if fn is autoattack else "aa_block_size"].default is None, fn.__name__
    assert EvalConfig().aa_block_size is None
    note = idle_note(100, 500, 2)  # the user's 500 on 2 ranks: one block, one rank idle
    assert "1 block(s) of 500 points for 2 ranks leave 1 idle" in note and "aa_block_size <= 50" in note
    assert "\n" not in note and len(rank_blocks(100, 50, 1, 2)) == 1


def test_evaluate_model_prints_progress_lines_on_rank_0(monkeypatch, capsys):
    """PGD rounds and AutoAttack's plan, blocks and results reach stderr (throttle off; an untrained
    model, random noise for AutoAttack's attacks, in its default blocks); progress=False prints nothing."""
    from dist_robust import evaluate_model
    from dist_robust.utils import lines
    model, test = _fresh_model().eval(), load_dataset("digits", "test")
    monkeypatch.setattr(lines, "EVERY_S", 0.0)
    monkeypatch.setattr(aa_mod, "build_attack", lambda name, net, eps, norm, *rest: _RandomSign(eps))
    data = (test.images[:16], test.labels[:16])
    res = evaluate_model(model, data, ["clean", "pgd-2", "aa"], eps=0.15, batch_size=8)
    err = capsys.readouterr().err
    assert res["attacks"]["aa"]["block_size"] == 2
    assert "eval: blocks 2/2 (16/16 points): clean" in err and "pgd-2" in err, err
    assert "autoattack standard on 16 points: 8 block(s) of 2 over 1 rank(s); apgd-ce, apgd-t, fab-t, square" in err
    assert "autoattack apgd-ce: block 8/8 (points 14-15):" in err and "/16 robust so far" in err
    assert "autoattack square:" in err and "attacked points still robust" in err
    assert err.count("autoattack apgd-t: block") == 8
    evaluate_model(model, data, ["clean", "pgd-2", "aa"], eps=0.15, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""
