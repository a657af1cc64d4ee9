"""pytest-benchmark set-up for benchmarks/bench_*.py (run: ``pytest benchmarks/``).

Without CUDA, TRITON_INTERPRET=1 is set before triton is imported (as in tests/conftest.py) and the
suite is a smoke run (see ``benchmarks/_util.py``: ``from benchmarks._util import is_smoke, annotate,
measure``). Each run records the GPU, torch/triton/CUDA versions and the smoke flag in the JSON's
machine_info, which ``python -m benchmarks.results`` reads.
"""
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `benchmarks` is a plain folder (no __init__.py), imported as a namespace package from the
# repository root, which is APPENDED to sys.path: prepending it (what pytest does for a package
# conftest) would let the source tree's diffaccel/, which holds no compiled _C, shadow the
# installed wheel.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.append(_REPO)


from benchmarks._util import DEADLINE_ENV, environment_info, past_deadline  # noqa: E402  (after the sys.path set-up)


def pytest_runtest_teardown(item, nextitem):
    # a run under a hard time limit (benchmarks/gpu_session.sh) ends cleanly before it, so the
    # JSON / junit reports of what did run are still written
    if nextitem is not None and past_deadline():
        item.session.shouldstop = f"{DEADLINE_ENV} passed: the remaining tests were not run"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # pytest-benchmark keeps a case's timing even when the test then fails its output check (every
    # bench_*.py asserts after measure()); the outcome goes into the JSON, and results.py records
    # passed cases only
    report = yield
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if fixture is not None and report.when == "call":
        fixture.extra_info["outcome"] = report.outcome
    elif fixture is not None and report.failed:  # setup / teardown errors spoil the case too
        fixture.extra_info["outcome"] = "failed"
    return report


def pytest_collect_file(file_path, parent):
    # pyproject's python_files is test_*.py; benchmark modules are bench_*.py
    # a file named on the command line is collected by pytest itself; collecting it here too doubles it
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    from benchmarks._util import is_smoke

    lines = [f"diffaccel benchmarks: {'SMOKE run (no CUDA: tiny shapes, one round, not recordable)' if is_smoke() else 'GPU run'}"]
    if config.getoption("benchmark_disable", default=False):
        lines.append("benchmarks: timing DISABLED (pyproject addopts has --benchmark-disable); "
                     "pass --benchmark-enable to measure")
    return lines


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["diffaccel_env"] = environment_info()


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    result = yield
    if group_by != "group":
        return result
    # one table per group *and* shape/dtype, so ours and its baselines sit together
    groups = defaultdict(list)
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        key = bench["group"]
        if info.get("shape") is not None:
            key = f"{key} [{info['shape']} {info.get('dtype', '')}]".replace(" ]", "]")
        groups[key].append(bench)
    for members in groups.values():
        members.sort(key=lambda b: b["name"])
    return sorted(groups.items(), key=lambda kv: kv[0] or "")
