"""Hypothesis runs a fixed set of examples by default, so a CI run passes or fails the
same way every time; ``HYPOTHESIS_PROFILE=explore`` searches fresh random examples.

The tests that start ``vllm serve`` (``SERVER_TESTS``, ``SIDE_SERVER_TESTS``) carry the
``serve`` marker, and other tests over about 20 s the ``slow`` one, so that
``-m "not serve and not slow"`` is the quick run.

``scripts/test.sh`` runs two pytest-xdist workers. Each list of server tests is one unit
of work, and the two units go first, one to each worker, their modules one after another.
Memory decides the split: a demo-model server holds about 4.4 GiB here (PSS of its
processes), and used memory peaked at 12.6 GiB in the parallelism module, 13.2 in the
vision one (three servers of 2 GiB of KV cache each) and more in ``test_vllm_serve``
(four demo-model servers at once), so those never run beside each other; the side list
is what fits beside any of them (4.3 GiB for the hybrid module's two servers). The side
worker then runs the rest of the suite. vLLM binds a single-process server's
model to core 0 (``VLLM_CPU_OMP_THREADS_BIND=auto``), so the side unit's servers are bound
to the last core: before, the other core idled once the rest of the suite was done.
(xdist's own ``xdist_group`` mark does not group under pytest 9, which no longer reads
the node id xdist rewrites.)
"""

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A new module or test that starts servers belongs in one of these lists: they mark it
# `serve` and schedule it (xdist's controller sees node ids, not markers).
SERVER_TESTS = (
    "tests/test_vllm_dtypes.py",
    "tests/test_vllm_parallel.py",
    "tests/test_vllm_serve.py",
    "tests/test_vllm_vision.py",
)
# Single-process servers only (a tensor- or pipeline-parallel one needs a core per rank),
# at most two at a time.
SIDE_SERVER_TESTS = (
    "tests/test_throughput_benchmark.py::test_quick_throughput_benchmark",
    "tests/test_vllm_hybrid.py::test_start_up_compresses_the_full_attention_layers_only",
    "tests/test_vllm_hybrid.py::test_request_budget_one_reproduces_stock_greedy_tokens",
    "tests/test_vllm_hybrid.py::test_full_attention_usage_falls_by_the_block_arithmetic_and_sliding_layers_stay_stock",
    "tests/test_vllm_hybrid.py::test_preemption_and_aborts_leave_no_blocks_behind",
    "tests/test_vllm_startup.py",
)


def server_unit(nodeid: str) -> int | None:
    """0 for ``SERVER_TESTS``, 1 for ``SIDE_SERVER_TESTS``, None for a test that starts no server."""
    for unit, tests in enumerate((SERVER_TESTS, SIDE_SERVER_TESTS)):
        if nodeid.startswith(tests):
            return unit
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        if server_unit(item.nodeid) is not None:
            item.add_marker(pytest.mark.serve)
    order = {0: 0, 1: 1, None: 2}
    items.sort(key=lambda item: order[server_unit(item.nodeid)])  # stable: each part keeps its order


@pytest.fixture(scope="module")
def model() -> str:
    """The model a server test module serves: the demo model, built on first use (test_vllm_vision.py serves its own)."""
    from prefixkv_vllm.tools.demo_model import demo_model_path

    return str(demo_model_path())


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    """Where a server test module's servers write their logs."""
    return tmp_path_factory.mktemp("vllm-logs")


@pytest.fixture(scope="module", autouse=True)
def side_servers_on_the_last_core(request):
    if not any(test.startswith(request.node.nodeid) for test in SIDE_SERVER_TESTS):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:  # the servers' environment is this process's
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(max(os.sched_getaffinity(0))))
        yield


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None  # another --dist the caller chose: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class ServersTogether(LoadScopeScheduling):
        """Modules as work units, as ``--dist loadscope``; each list of server tests one unit."""

        def _split_scope(self, nodeid: str) -> str:
            unit = server_unit(nodeid)
            return super()._split_scope(nodeid) if unit is None else f"vllm-servers-{unit}"

    return ServersTogether(config, log)
