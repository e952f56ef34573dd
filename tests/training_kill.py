"""Run the compsft CLI, SIGKILLing the process itself right after a given step of a given phase.

Usage: python tests/training_kill.py PHASE STEP -- compsft arguments...
The kill comes at the end of step STEP, i.e. after any checkpoint saved at an earlier step and
with the work since then lost, as a real crash would.
"""
import os
import signal
import sys

from transformers import TrainerCallback

from compsft.training import trainer as trainer_module

phase, step = int(sys.argv[1]), int(sys.argv[2])
assert sys.argv[3] == "--"
sys.argv = ["compsft"] + sys.argv[4:]


class Killer(TrainerCallback):
    def __init__(self, tuner):
        self.tuner = tuner

    def on_step_end(self, args, state, control, **kwargs):
        if self.tuner._phase == phase and state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)


original_init = trainer_module.SparseFineTuner.__init__


def patched_init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(Killer(self))


trainer_module.SparseFineTuner.__init__ = patched_init

from compsft.cli import main  # noqa: E402

main()
