"""The soak test (bench/soak.py) with a small count: a regression net for leaks and lost requests.

Marked ``soak`` (``pytest -m "not soak"`` leaves it out locally); it is part of the default run and CI.
About 240 mixed requests against a real server process: every request must end with a status its kind
allows, the server must count every request that reaches it, the metric series must stay flat after
warm-up (unknown method names must not create series) and the queue must drain. The server runs
under tracemalloc (``--trace``): after the drain no per-request object (request state, handle, event
channel, slot, call) is alive, and the Python heap does not grow over the second half. RSS still
climbs towards its plateau at this length (per-shape caches), so the RSS limit here only catches gross
leaks (640 MiB per 1000 requests); the full run (3000 requests, docs/reliability.md) checks it tightly.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from soak import PER_REQUEST_TYPES  # noqa: E402


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_small(tmp_path):
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--requests", "240", "--warmup", "80",
         "--concurrency", "8", "--max-rss-slope-mib", "640", "--trace", "6", "--json", str(report_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    report = json.loads(report_path.read_text())
    assert report["requests"] == report["sent"] == 240
    assert report["failures"] == []
    assert set(report["by_kind"]) == {"generate", "stream_slow", "cancel", "deadline", "invalid", "unknown",
                                      "unauth", "http"}
    assert report["by_kind"]["unknown"].get("UNAUTHENTICATED", 0) > 0  # the interceptor saw random names
    assert report["series_new_count"] <= 4
    # Memory at the Python level (--trace: tracemalloc and live objects in the server, after the drain):
    # no per-request object outlives its request, and the traced heap does not grow over the second half.
    assert report["trace_warm_to_end"]["live_per_request_objects"] == {k: 0 for k in PER_REQUEST_TYPES}
    start_mib, end_mib = report["trace_mid_to_end"]["python_traced_mib"]
    assert end_mib - start_mib < 2.0, report["trace_mid_to_end"]["top_python_growth"]


def test_images_preload_the_allocator_the_soak_measures():
    """The soak measures the server with jemalloc because the container images run it so: keep them in step."""
    from soak import JEMALLOC

    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "deploy" / "docker" / name).read_text()
        assert "libjemalloc2" in text and f"LD_PRELOAD={JEMALLOC}" in text, name
