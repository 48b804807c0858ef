"""A local Ray cluster for tests and benches: the skip rule, the cluster's size, one cluster per test session.

A Ray test runs only where ray is installed (``make install-ray``) AND inside a network namespace that has
nothing but loopback (``make test-ray`` puts pytest there with ``unshare -n``). Outside such a namespace
Ray advertises the machine's address, listens on every interface and probes cloud metadata and a public
DNS server, which no test here may do, so the tests skip and say how to run them.

    pytestmark = ray_marks()                                     # in a test module, or @ray_test on one test
    @pytest.mark.usefixtures("ray_cluster")                      # tests/conftest.py imports the fixture
    def test_x(): ...
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no usage report, no cloud probes behind it
os.environ.setdefault("RAY_AUTH_MODE", "disabled")       # 2.60 otherwise writes a token to ~/.ray

CLUSTER = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 256 * 2**20,
           "namespace": "capguard"}


def loopback_only() -> bool:
    """True inside a network namespace whose only interface is lo (``unshare -n``, then ``ip link set lo up``)."""
    try:
        return [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


def ray_marks() -> list:
    """``pytestmark`` for a Ray test module: marked ``ray``, skipped with the reason when it cannot run here."""
    marks = [pytest.mark.ray]
    if importlib.util.find_spec("ray") is None:
        marks.append(pytest.mark.skip(reason="ray is not installed: make install-ray"))
    elif not loopback_only():
        marks.append(pytest.mark.skip(reason="Ray tests run in a loopback-only network namespace: make test-ray"))
    return marks


def ray_test(function):
    """Decorator form of ``ray_marks`` for one test in a module that also has plain tests."""
    for mark in ray_marks():
        function = mark(function)
    return function


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local cluster owned by this test session (ray.init / ray.shutdown; never `ray stop`)."""
    import ray

    assert loopback_only(), "refusing to start Ray outside a loopback-only network namespace"
    # workers inherit the driver's environment: one torch/BLAS thread each (2 cores shared by everything)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = ray.init(**CLUSTER)
    try:
        yield context
    finally:
        end_cluster()


def end_cluster(grace_s: float = 10.0) -> None:
    """ray.shutdown(), then end by id the cluster's processes that outlived it.

    Ray Data's pool workers (ray::MapWorker, torch loaded) were seen to outlive ray.shutdown() as orphans;
    on a shared machine each one holds hundreds of MB. Only descendants of this process are touched.
    """
    import psutil
    import ray

    ours = psutil.Process().children(recursive=True)
    ray.shutdown()
    _, alive = psutil.wait_procs([p for p in ours if p.is_running()], timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
