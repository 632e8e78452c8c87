"""Shared fixtures, and one thread per test process."""

import os
import socket

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
def free_port() -> int:
    """A TCP port nobody listens on, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
