"""Shared fixtures."""

import socket

import pytest
import torch


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
