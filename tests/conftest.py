"""Process state that a test may change and the next test must not inherit."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Bench scripts run in-process (`bench/predict_speed.py --quick`) and executors that run jobs in this
    process set torch's thread count; a later bit-exactness test that compares this process's sums with a
    subprocess's (test_training_cli's resume after SIGKILL) then failed in the full suite only."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
