"""Shared fixtures, and one thread per test process."""

import os
import subprocess
import sys

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs one pytest-xdist worker per core: each worker and the processes its tests start (torchrun,
    entry points; a test that wants other counts sets them itself) compute on one thread, so the workers never
    oversubscribe the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")
        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and 2 OpenMP threads on a busy 2-core machine stall on barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torchrun():
    """Run ``args`` under torchrun with two gloo processes on one thread each, and fail with their output's tail.
    ``--standalone``: the rendezvous binds a free port itself, so tests running side by side never race for one."""
    def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done
    return run
