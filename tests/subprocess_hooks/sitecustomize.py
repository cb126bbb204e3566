"""For tests that run `seqexp` in a process of its own (tests/test_resume.py): with this folder
and tests/ on PYTHONPATH, Python reads this file as it starts, in that process and in those it
starts (submitit's workers), and the trainer of each run gets the callback asked for:
SEQEXP_TEST_HOLD_AFTER_EPOCH=k (helpers.HoldAfterEpoch) or SEQEXP_TEST_SIGNAL_AFTER_EPOCH=k:NAME
(helpers.SignalAfterEpoch, signal SIGNAME)."""

import os
import signal

HOLD_ENV = "SEQEXP_TEST_HOLD_AFTER_EPOCH"
SIGNAL_ENV = "SEQEXP_TEST_SIGNAL_AFTER_EPOCH"

if os.environ.get(HOLD_ENV) or os.environ.get(SIGNAL_ENV):
    import helpers
    from seqexp.run import experiment

    if os.environ.get(HOLD_ENV):
        callback = helpers.HoldAfterEpoch(int(os.environ[HOLD_ENV]))
    else:
        epoch, name = os.environ[SIGNAL_ENV].split(":")
        callback = helpers.SignalAfterEpoch(int(epoch), getattr(signal, f"SIG{name}"))
    experiment.build_trainer = helpers.adding_callback(experiment.build_trainer, callback)
