"""Hypothesis runs a fixed set of examples by default, so a CI run passes or fails the
same way every time; ``HYPOTHESIS_PROFILE=explore`` searches fresh random examples.

The tests that start ``vllm serve`` (``SERVER_TESTS``) carry the ``serve`` marker, and
other tests over about 20 s the ``slow`` one, so that ``-m "not serve and not slow"``
is the quick run.

``scripts/test.sh`` runs two pytest-xdist workers. The tests that start vLLM servers
run on one of them, one after another, and first: a demo-model server holds about 5 GB
here, and two modules' servers side by side outgrew this 24 GiB machine (seen). The
other worker runs the rest of the suite beside them. (xdist's own ``xdist_group`` mark
does not group under pytest 9, which no longer reads the node id xdist rewrites.)
"""

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A new module or test that starts servers belongs here: this list marks them `serve` and
# schedules them (xdist's controller sees node ids, not markers).
SERVER_TESTS = (
    "tests/test_vllm_serve.py",
    "tests/test_vllm_hybrid.py::test_start_up_compresses_the_full_attention_layers_only",
    "tests/test_vllm_hybrid.py::test_request_budget_one_reproduces_stock_greedy_tokens",
    "tests/test_vllm_hybrid.py::test_full_attention_usage_falls_by_the_block_arithmetic_and_sliding_layers_stay_stock",
    "tests/test_vllm_hybrid.py::test_preemption_and_aborts_leave_no_blocks_behind",
    "tests/test_vllm_vision.py",
    "tests/test_vllm_dtypes.py",
    "tests/test_vllm_parallel.py",
    "tests/test_throughput_benchmark.py::test_quick_throughput_benchmark",
)


def starts_servers(nodeid: str) -> bool:
    return nodeid.startswith(SERVER_TESTS)


def pytest_collection_modifyitems(items):
    for item in items:
        if starts_servers(item.nodeid):
            item.add_marker(pytest.mark.serve)
    items.sort(key=lambda item: not starts_servers(item.nodeid))  # stable: each part keeps its order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None  # another --dist the caller chose: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class ServersTogether(LoadScopeScheduling):
        """Modules as work units, as ``--dist loadscope``; every server test in one unit."""

        def _split_scope(self, nodeid: str) -> str:
            return "vllm-servers" if starts_servers(nodeid) else super()._split_scope(nodeid)

    return ServersTogether(config, log)
