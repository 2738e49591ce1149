"""The soak test (bench/soak.py) with a small count: a regression net for leaks and lost requests.

Marked ``soak`` (``pytest -m "not soak"`` leaves it out locally); it is part of the default run and CI.
About 240 mixed requests against a real server process: every request must end with a status its kind
allows, the server must count every request that reaches it, the metric series must stay flat after
warm-up (unknown method names must not create series) and the queue must drain. RSS still climbs
towards its plateau at this length, so the RSS limit here only catches gross leaks (64 MiB per 100
requests); the full run (3000 requests, bench/results/soak.json) checks it tightly.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_small(tmp_path):
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--requests", "240", "--warmup", "80",
         "--concurrency", "8", "--max-rss-slope-kib", str(64 * 1024), "--json", str(report_path)],
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
