"""A client in another language, generated from the protos at run time (Node.js @grpc/grpc-js)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / ".ci" / "node_modules"


async def test_node_client_generates_streams_and_sees_invalid_argument(make_server):
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@grpc" / "grpc-js").exists():
        assert not os.environ.get("CI"), "CI installs node's @grpc/grpc-js and @grpc/proto-loader into .ci/"
        pytest.skip("node or @grpc/grpc-js missing (npm install --prefix .ci @grpc/grpc-js @grpc/proto-loader)")
    server = await make_server()
    proc = await asyncio.create_subprocess_exec(
        node, str(ROOT / "tests" / "node" / "client.js"), f"127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["model"] == "tiny" and seen["default_steps"] == 8
    assert seen["generate"] == {"seed": "42", "mime": "image/png", "bytes": seen["generate"]["bytes"]}
    assert seen["generate"]["bytes"] > 100
    assert seen["invalid"]["code"] == 3 and "prompt" in seen["invalid"]["details"]  # INVALID_ARGUMENT
    assert seen["events"][0] == "queued" and seen["events"][-1] == "completed"
    assert seen["events"].count("step:1") == 3
