"""CPU runs set TRITON_INTERPRET=1 before anything imports triton, so Triton kernels run in the
interpreter; `gpu` tests skip without a CUDA device."""
import os
import time

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


DEADLINE_ENV = "DIFFACCEL_PYTEST_DEADLINE"  # unix time after which no new test starts


def pytest_runtest_teardown(item, nextitem):
    # a run under a hard time limit (benchmarks/gpu_session.sh) ends cleanly before it, so the
    # JSON / junit reports of what did run are still written
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and nextitem is not None and time.time() > float(deadline):
        item.session.shouldstop = f"{DEADLINE_ENV} passed: the remaining tests were not run"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests choose backends explicitly; an exported DIFFACCEL_BACKEND must not leak in."""
    monkeypatch.delenv("DIFFACCEL_BACKEND", raising=False)
    monkeypatch.delenv("DIFFACCEL_DISABLE", raising=False)
