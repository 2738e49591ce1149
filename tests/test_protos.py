"""The committed stubs match the protos, and the protos keep the contract's names."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_up_to_date(tmp_path):
    _load_generator().generate(tmp_path)
    committed = ROOT / "client" / "zimage" / "v1"
    fresh = tmp_path / "zimage" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == ["zimage_pb2.py", "zimage_pb2.pyi", "zimage_pb2_grpc.py"]
    for name in names:
        assert (committed / name).read_text() == (fresh / name).read_text(), (
            f"client/zimage/v1/{name} is stale: run `python scripts/gen_protos.py`"
        )


def test_contract_names():
    from zimage.v1 import zimage_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ImageGenerationService"]
    assert service.full_name == "zimage.v1.ImageGenerationService"
    assert {"Generate", "StreamProgress", "GetModelInfo"} <= set(service.methods_by_name)
    assert service.methods_by_name["StreamProgress"].output_type.name == "ProgressEvent"
    fields = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {"prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images",
            "output_format"} <= fields
    assert {"data", "mime_type", "width", "height", "seed"} <= set(pb.Image.DESCRIPTOR.fields_by_name)
    oneof = pb.ProgressEvent.DESCRIPTOR.oneofs_by_name["event"]
    assert [f.name for f in oneof.fields] == ["queued", "started", "step", "completed"]
    assert pb.ProgressEvent.DESCRIPTOR.fields_by_name["completed"].message_type.name == "GenerateResponse"


def test_buf_lint_is_clean():
    buf = shutil.which("buf") or next((str(p) for p in [ROOT / ".ci" / "node_modules" / ".bin" / "buf"] if p.exists()),
                                      None)
    if buf is None:
        assert not os.environ.get("CI"), "CI must install buf (.ci/run does: npm install --prefix .ci @bufbuild/buf)"
        pytest.skip("buf is not installed here; .ci/run installs it and runs this test")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([buf, "format", "--diff", "--exit-code"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
