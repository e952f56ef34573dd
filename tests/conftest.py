"""Process state that a test may change and the next test must not inherit."""
from __future__ import annotations

import signal
import warnings

import pytest


@pytest.fixture(autouse=True)
def _keep_process_state(request):
    """torch's thread count and the SIGINT handler, as each test found them.

    Bench scripts run in-process (`bench/predict_speed.py --quick`) and executors that run jobs in this
    process set the thread count; a later bit-exactness test comparing this process's sums with a
    subprocess's (test_training_cli's resume after SIGKILL) then failed in the full suite only. Likewise a
    test that left SIGINT ignored made the Ctrl-C test of `compare --workers` (and any child process, which
    inherits an ignored SIGINT) ignore Ctrl-C."""
    import torch

    threads = torch.get_num_threads()
    handler = signal.getsignal(signal.SIGINT)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if signal.getsignal(signal.SIGINT) is not handler:
        warnings.warn(f"{request.node.nodeid} left SIGINT as {signal.getsignal(signal.SIGINT)!r}; restored")
        signal.signal(signal.SIGINT, handler)
