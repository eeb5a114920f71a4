"""Fixtures shared by the tests of the ``sam`` package."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the digits CNN is as fast on one, and far faster when other jobs
    share a small CPU. Modules take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
