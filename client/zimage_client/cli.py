"""``zimage``: command-line client.

    zimage generate "a red fox" -o fox.png --width 256 --height 256 [--stream] [--previews DIR]
    zimage info
    zimage health
    zimage --target HOST:PORT[,HOST:PORT...] ...
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import grpc
from google.protobuf import json_format

from .client import FORMATS, ZImageClient, build_request

_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zimage", description="Client for zimage-serve.")
    p.add_argument("--target", default=os.environ.get("ZIMAGE_TARGET", "127.0.0.1:50051"),
                   help="HOST:PORT, several comma-separated (round-robin), or dns:///NAME:PORT [env ZIMAGE_TARGET]")
    p.add_argument("--token-file", help="file with a bearer token")
    p.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    p.add_argument("--ca", help="CA certificate (PEM) to verify the server; implies --tls")
    p.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--retries", type=int, default=3, help="retries of UNAVAILABLE with backoff")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="output file; several images get -0, -1... suffixes")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=0)
    g.add_argument("--height", type=int, default=0)
    g.add_argument("--steps", type=int, default=0)
    g.add_argument("--guidance-scale", type=float, default=None, help="default: the model's (0 for Turbo)")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--format", choices=sorted(FORMATS), default=None, help="default: from the output extension")
    g.add_argument("--quality", type=int, default=0)
    g.add_argument("--priority", type=int, default=0)
    g.add_argument("--timeout-ms", type=int, default=0)
    g.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]")
    g.add_argument("--init-image", metavar="FILE", help="image-to-image: start from this PNG/JPEG/WebP")
    g.add_argument("--strength", type=float, default=None,
                   help="with --init-image: 0 < s <= 1 (default: 0.6, or 1.0 with --mask)")
    g.add_argument("--mask", metavar="FILE", help="with --init-image: inpaint where the mask is white")
    g.add_argument("--control", metavar="FILE", help="ControlNet conditioning image (pose/depth/canny map)")
    g.add_argument("--control-scale", type=float, default=0.0, help="ControlNet strength (default 0.75)")
    g.add_argument("--stream", action="store_true", help="stream progress with a progress bar")
    g.add_argument("--previews", metavar="DIR", help="save per-step previews here (implies --stream)")
    g.add_argument("--preview-every", type=int, default=1)
    g.add_argument("--json", action="store_true", help="print the result metadata as JSON")

    sub.add_parser("info", help="show the model, defaults and limits")
    h = sub.add_parser("health", help="show the health status")
    h.add_argument("--service", default="")
    h.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="poll until SERVING (or the time runs out); for scripts that start a server")
    return p


def _client(args: argparse.Namespace) -> ZImageClient:
    read = lambda path: pathlib.Path(path).read_bytes() if path else None  # noqa: E731
    token = pathlib.Path(args.token_file).read_text().strip() if args.token_file else None
    return ZImageClient(args.target, token=token, tls=args.tls or bool(args.ca), root_certificates=read(args.ca),
                        client_cert_chain=read(args.cert), client_key=read(args.key), retries=args.retries)


def _output_paths(output: str, count: int, mime: str) -> list[pathlib.Path]:
    path = pathlib.Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or _EXT.get(mime, '.png')}") for i in range(count)]


def _read(path: str | None) -> bytes:
    """An input image file's bytes, sent as they are (the server decodes, checks and resizes them)."""
    return pathlib.Path(path).read_bytes() if path else b""


def _generate(args: argparse.Namespace) -> int:
    fmt = args.format or {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(pathlib.Path(args.output).suffix.lower(),
                                                                              "png")
    loras = []
    for item in args.lora:
        name, _, scale = item.partition(":")
        loras.append((name, float(scale or 1.0)))
    stream = args.stream or bool(args.previews)
    request = build_request(
        args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed, num_images=args.num_images, output_format=fmt,
        quality=args.quality, priority=args.priority, timeout_ms=args.timeout_ms, loras=loras,
        preview_every_n_steps=args.preview_every if args.previews else 0,
        init_image=_read(args.init_image), strength=args.strength, mask_image=_read(args.mask),
        control_image=_read(args.control), control_scale=args.control_scale,
    )
    with _client(args) as client:
        if not stream:
            result = client.generate(request)
        else:
            result = None
            bar = None
            from tqdm import tqdm

            preview_dir = pathlib.Path(args.previews) if args.previews else None
            if preview_dir:
                preview_dir.mkdir(parents=True, exist_ok=True)
            for update in client.stream(request):
                if update.kind == "queued":
                    print(f"queued at position {update.queue_position}", file=sys.stderr)
                elif update.kind == "started":
                    print(f"started in a batch of {update.batch_size}", file=sys.stderr)
                elif update.kind == "step":
                    if bar is None:
                        bar = tqdm(total=update.total_steps, unit="step", file=sys.stderr)
                    bar.update(update.step - bar.n)
                    for preview in update.previews:
                        if preview_dir:
                            name = f"step{update.step:03d}-{preview.index}{_EXT.get(preview.mime_type, '.jpg')}"
                            (preview_dir / name).write_bytes(preview.data)
                elif update.kind == "completed":
                    result = update.result
            if bar is not None:
                bar.close()
            assert result is not None
    paths = _output_paths(args.output, len(result.images), result.images[0].mime_type)
    for path, image in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
    summary = {"request_id": result.request_id, "batch_size": result.batch_size,
               "total_seconds": round(result.total_seconds, 3),
               "images": [{"path": str(p), "seed": i.seed, "width": i.width, "height": i.height}
                          for p, i in zip(paths, result.images, strict=True)]}
    if args.json:
        print(json.dumps(summary))
    else:
        for item in summary["images"]:
            print(f"saved {item['path']} ({item['width']}x{item['height']}, seed {item['seed']})")
    return 0


def _health(client: ZImageClient, service: str, wait_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = client.health(service)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                raise
            status = "UNAVAILABLE"
        if status == "SERVING" or time.monotonic() >= deadline:
            return status
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            code = _generate(args)
        elif args.command == "info":
            with _client(args) as client:
                print(json_format.MessageToJson(client.info(), always_print_fields_with_no_presence=True))
            code = 0
        else:
            with _client(args) as client:
                status = _health(client, args.service, args.wait)
            print(status)
            code = 0 if status == "SERVING" else 1
    except grpc.RpcError as err:
        print(f"zimage: {err.code().name}: {err.details()}", file=sys.stderr)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
