"""Chaos: the 2-rank reference run under ``torchrun --max-restarts=3`` is hit at 5 seeded random moments by
a SIGKILL of a random rank (torchrun restarts the group, which resumes from its last checkpoint) or a
SIGTERM of the launcher (every rank stops at one step with a checkpoint; the command is started again by
hand), and still ends with the unbroken reference run's weights, bitwise."""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import ENV, QUICKSTART, REFERENCE, ROOT, children, logged_step, same_weights, torchrun_cmd

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

FAULTS, SEED, MAX_RESTARTS = 5, 0, 3
STEPS = 44  # the reference run: 2 epochs of 22 steps


def _start(args):
    cmd = torchrun_cmd(*args)
    cmd.insert(cmd.index("--standalone") + 1, f"--max-restarts={MAX_RESTARTS}")
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_run_hit_by_random_kills_and_stops_ends_bitwise_as_the_unbroken_one(tmp_path, reference):
    rng = random.Random(SEED)
    run = tmp_path / "chaos"
    args = ("train", QUICKSTART, *REFERENCE, f"run.out_dir={tmp_path}", "run.name=chaos")
    # the moments: after these logged steps (the run goes back to a checkpoint after each fault)
    moments = sorted(rng.sample(range(4, STEPS - 2), FAULTS))
    proc, kills, events, outputs = _start(args), 0, [], []
    try:
        for moment in moments:
            deadline = time.time() + 300
            while logged_step(run) < moment or len(children(proc.pid)) < 2:
                assert proc.poll() is None, "".join(outputs) + proc.stdout.read()[-3000:]
                assert time.time() < deadline, f"no step {moment} after 300 s"
                time.sleep(0.02)
            if kills < MAX_RESTARTS and rng.random() < 0.6:  # a rank dies; torchrun restarts the group
                os.kill(rng.choice(children(proc.pid)), signal.SIGKILL)
                kills += 1
                events.append(f"SIGKILL of a rank at step {moment}")
            else:  # the node is told to stop: the run stops with a checkpoint and is started again by hand
                proc.send_signal(signal.SIGTERM)
                out, _ = proc.communicate(timeout=120)
                outputs.append(out)
                assert proc.returncode != 0, out[-3000:]
                proc, kills = _start(args), 0
                events.append(f"SIGTERM of torchrun at step {moment}")
        out, _ = proc.communicate(timeout=600)
        outputs.append(out)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, whatever was redone
    print(f"{len(events)} of {FAULTS} faults survived ({'; '.join(events)}), final weights identical")
