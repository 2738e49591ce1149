"""Shared fixtures: one tiny engine per session, real grpc.aio servers on 127.0.0.1:0."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CI (set by .ci/run) must run every test: a skip there means a missing tool or extra, i.e. a broken CI.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_skip(report) -> None:
    """Turn a skip into a failure that says why the test would have been skipped."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which must run every test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # Module-level skips (pytest.importorskip, pytest.skip(allow_module_level=True)) happen at collection.
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        _fail_skip(report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_engine():
    """The tiny preset, loaded once (0.3 s) and shared: tests must not leave fault hooks behind."""
    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine

    engine = ZImageEngine.load(EngineConfig(model="tiny"))
    yield engine
    engine.fault_hook = None


@pytest.fixture
async def make_server(tiny_engine):
    """Start ZImageServer instances on loopback with the shared tiny engine; stopped at teardown."""
    from zimage_server.app import ZImageServer
    from zimage_server.config import SchedulerConfig, ServerConfig

    servers = []

    async def factory(*, engine=None, metrics=False, **overrides):
        scheduler_fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
        sched = {k: v for k, v in overrides.items() if k in scheduler_fields}
        # Tests name the mode they exercise; request-level batching unless they ask for step.
        sched.setdefault("batching", "request")
        server_kw = {k: v for k, v in overrides.items() if k not in scheduler_fields}
        config = ServerConfig(
            scheduler=SchedulerConfig(**sched), host="127.0.0.1", port=0,
            metrics_host="127.0.0.1", metrics_port=free_port() if metrics else 0, **server_kw,
        )
        server = ZImageServer(config, engine=engine if engine is not None else tiny_engine)
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop(0)
    tiny_engine.fault_hook = None
    tiny_engine.packed_forwards = False  # a --mix-resolutions packed server turned it on


@pytest.fixture(scope="session")
def tiny_engine_controlnet():
    """The tiny preset with its random ControlNet (--controlnet preset), loaded once and shared."""
    from zimage_server.config import EngineConfig
    from zimage_server.engine.engine import ZImageEngine

    engine = ZImageEngine.load(EngineConfig(model="tiny", controlnet="preset"))
    yield engine
    engine.fault_hook = None
