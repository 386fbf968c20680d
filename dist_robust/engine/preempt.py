"""SIGTERM and SIGINT stop a training run cleanly: every rank at the same step, with a checkpoint.

While the training loop runs, such a signal only notes that it came (``StopSignals``); each step's one
all_reduce (the finite-loss flags) carries the note to every rank, so all ranks finish the same step,
write the checkpoint of that step together and raise ``Stopped``. The command exits with 128 + the
signal's number (143 for SIGTERM, 130 for SIGINT), and ``train.resume=auto`` continues bitwise as an
unbroken run. The two classes live on the bottom floor (utils/signals.py), where the evaluation's block
loop and RiFT's stages use them too. A signal during setup or a validation is honoured at the next step
(after the last epoch's: the process ends there, its epoch checkpoint written); outside these loops (the
export, AutoAttack) the previous handlers act: the process ends at once, and an AutoAttack evaluation
continues from its saved state when started again.
"""
from ..utils.signals import STOP_SIGNALS, Stopped, StopSignals

__all__ = ["STOP_SIGNALS", "StopSignals", "Stopped"]
