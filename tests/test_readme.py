"""The README's commands are the contract with a new user: keep them exact and tested."""

from __future__ import annotations

import io
import pathlib
import re
import shlex
import subprocess
import sys

from conftest import free_port
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = bash_blocks()[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_flag_is_documented():
    from zimage_server.cli import OPTIONS

    for option in OPTIONS:
        assert f"`{option.flag}`" in README or f"{option.flag}`" in README, option.flag


def test_every_metric_is_documented():
    from zimage_server.metrics import Metrics

    metrics = Metrics()
    names = {family.name for family in metrics.registry.collect()}
    names |= {"zimage_recompilations", "zimage_gpu_memory_allocated_bytes", "zimage_gpu_memory_reserved_bytes"}
    for name in names:
        documented = any(f"`{name}{suffix}" in README for suffix in ("", "_total", "_info"))
        assert documented, name


def test_quick_start_commands_work(tmp_path):
    """Runs the quick start after its installs: the server command and the client commands, verbatim
    but for the port (a free one, so tests never collide)."""
    quick = bash_blocks()[0].strip()
    parts = [p.strip() for p in quick.split("&&")]
    server_cmd = next(p for p in parts if p.startswith("(zimage-server")).strip("()& ")
    health_cmd = next(p for p in parts if p.startswith("zimage health"))
    generate_cmd = next(p for p in parts if p.startswith("zimage generate"))
    port, metrics_port = free_port(), free_port()
    server_args = shlex.split(server_cmd.replace("50051", str(port)).replace("9464", str(metrics_port)))
    bin_dir = pathlib.Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / server_args[0]), *server_args[1:]], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        target = ["--target", f"127.0.0.1:{port}"]
        for command in (health_cmd, generate_cmd):
            args = shlex.split(command)
            result = subprocess.run([str(bin_dir / args[0]), *target, *args[1:]], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=180)
            assert result.returncode == 0, result.stdout + result.stderr
        image = Image.open(io.BytesIO((tmp_path / "fox.png").read_bytes()))
        assert image.format == "PNG" and image.size == (256, 256)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0


def test_image_inputs_commands_work(tmp_path):
    """The image-inputs section, verbatim but for the ports: a server with the preset ControlNet, then
    text-to-image, image-to-image, the mask one-liner, inpainting and ControlNet through the CLI."""
    block = next(b for b in bash_blocks() if "--controlnet preset" in b)
    lines = [line.strip() for line in block.strip().splitlines()]
    server_args = shlex.split(lines[0].rstrip("& ")) + ["--port", str(port := free_port()), "--metrics-port", "0"]
    bin_dir = pathlib.Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / server_args[0]), *server_args[1:]], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        target = ["--target", f"127.0.0.1:{port}"]
        subprocess.run([str(bin_dir / "zimage"), *target, "health", "--wait", "120"], cwd=tmp_path, check=True,
                       capture_output=True, timeout=180)
        for line in lines[1:]:
            args = shlex.split(line)
            if args[0] == "python":
                command = [sys.executable, *args[1:]]
            else:
                command = [str(bin_dir / args[0]), *target, *args[1:]]
            result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert result.returncode == 0, line + "\n" + result.stdout + result.stderr
        for name in ("fox.png", "watercolour.png", "inpainted.png", "wolf.png"):
            assert Image.open(tmp_path / name).size == (256, 256), name
        assert (tmp_path / "watercolour.png").read_bytes() != (tmp_path / "fox.png").read_bytes()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_readme_says_which_torch_build_and_what_exactness_is_tested():
    """The README's claims stay within what is measured: PyPI's Linux torch wheel is the CUDA build, and
    pixel-exact equality is tested only for one image, CPU float32, eager."""
    assert "first takes the CPU build" not in README
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert "--index-url https://download.pytorch.org/whl/cu128" in README
    assert "one image alone on CPU in float32, not compiled, equals `ZImagePipeline.__call__` pixel for pixel" \
        in README
    assert "GPU bfloat16 output has not been" in README
    # Benchmark quotes give the p50 and the mean at every load measured, not only the favourable one.
    table = README[README.index("| preset, load |"):]
    assert "| p50 ratio | mean ratio |" in table
    assert table.count("| tiny,") == 5 and table.count("| bench,") == 3
