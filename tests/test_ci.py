"""CI must fail when anything fails: a broken install, a skipped test."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shim(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_ci_run_fails_when_the_install_fails(tmp_path):
    """.ci/run in a scratch copy whose tools are shims: pip fails, everything else succeeds."""
    repo = tmp_path / "repo"
    (repo / ".ci" / "node_modules" / ".bin").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    _shim(repo / ".ci", "deploy-checks.sh", "echo deploy-checks ok")
    _shim(repo / ".ci" / "node_modules" / ".bin", "buf", "exit 0")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "npm"):
        _shim(bin_dir, tool, "exit 0")
    # python3 -m venv .venv: an activate script that puts the failing pip first on PATH.
    _shim(bin_dir, "python3", f'mkdir -p .venv/bin && echo "export PATH={bin_dir}/venv:\\$PATH" > .venv/bin/activate')
    (bin_dir / "venv").mkdir()
    _shim(bin_dir / "venv", "pip", 'echo "ERROR: No matching distribution found for torch==2.13.0" >&2; exit 1')
    _shim(bin_dir / "venv", "python", f'echo "python $* must not run after a failed install" > {tmp_path}/ran; exit 0')
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    result = subprocess.run(["bash", str(repo / ".ci" / "run")], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "No matching distribution" in result.stderr
    assert "deploy-checks ok" not in result.stdout  # CI stopped at the failure
    assert not (tmp_path / "ran").exists()


def test_ci_run_exports_ci():
    text = (ROOT / ".ci" / "run").read_text()
    assert 'export CI="${CI:-true}"' in text


def test_a_skip_fails_when_ci_is_set(tmp_path):
    """tests/conftest.py turns skips (in a test or at import, e.g. importorskip) into failures in CI."""
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_skipped():\n    pytest.skip('tool missing')\n"
    )
    (tmp_path / "test_importorskip.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_zimage')\n\ndef test_x():\n    pass\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")

    def run(ci: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci is not None:
            env["CI"] = ci
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                               "test_skips.py", "test_importorskip.py"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    local = run(None)
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout
    ci = run("true")
    assert ci.returncode != 0, ci.stdout
    assert "skipped in CI" in ci.stdout and "tool missing" in ci.stdout and "no_such_module_zimage" in ci.stdout
