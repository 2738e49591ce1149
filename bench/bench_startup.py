"""Start-up time: process launch to SERVING, beside the floor of importing torch and diffusers.

    python bench/bench_startup.py [--presets tiny,bench] [--repeats 2] [--no-compile] [--no-mechanisms] [--out FILE]

Rows (seconds, wall clock):
- floor:   ``python -c "import torch; from diffusers import ZImagePipeline"``
- import:  the server's own imports (optional back ends hidden, as a default start does), no model
- per preset: ``zimage-server --model P`` eager; ``--compile`` with an empty ``--compile-cache-dir``
  (cold); ``--compile`` again with that directory (warm: precompiled blocks loaded, see
  ``compile_cache.PrecompiledBlocks``). Launch -> the "serving" log line, which is written right after health
  turns SERVING.
- cache mechanisms of the regular ``torch.compile`` path, which --compile-cache-dir used before the
  precompiled blocks (tiny, compile + pre-warm alone, in a fresh process each): no cache; inductor's FX
  graph + AOTAutograd caches warm; ``torch.compiler.load_cache_artifacts`` of the bytes
  ``save_cache_artifacts`` wrote after a cold compile, into an empty cache directory. All three still run
  dynamo's tracing of every block variant.

Eager, floor and import rows are the median of ``--repeats`` interleaved rounds; compiled rows run once
(minutes each). The CPU column is the server process's own CPU time (its threads, not inductor's compile
workers): compare compiled rows by wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
FLOOR = "import torch; from diffusers import ZImagePipeline"
SERVER_IMPORTS = (
    "from zimage_server.config import EngineConfig; from zimage_server.engine import accel; "
    "accel.hide_unused_backends(EngineConfig()); import zimage_server.app, zimage_server.engine.engine"
)


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a command run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - started, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far, from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def until_serving(args: list[str], env: dict[str, str] | None = None,
                  timeout_s: float = 3600) -> tuple[float, float, str]:
    """Launch zimage-server; return (wall seconds to the 'serving' log line, the server's CPU seconds by
    then, the compile-cache log line if any). CPU seconds are far less sensitive to a busy machine."""
    cmd = [str(BIN / "zimage-server"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    cache_line = ""
    try:
        for line in proc.stderr:
            if " compile cache " in line:
                cache_line = line.split(" compile cache ", 1)[1].strip()
            if " serving " in line:
                return time.monotonic() - started, cpu_seconds(proc.pid), cache_line
            if time.monotonic() - started > timeout_s:
                break
        raise RuntimeError(f"{' '.join(cmd)} did not reach SERVING (exit {proc.poll()})")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


Row = tuple[str, str, float, float, str]  # preset, setup, wall s, CPU s, note


def report(rows: list[Row], row: Row) -> None:
    """Print a row as soon as it is measured (compiled rows take minutes on a busy CPU)."""
    if not rows:
        print(f"| preset | setup | launch->SERVING wall s | CPU s | note |\n|---|---|---|---|---|", flush=True)
    rows.append(row)
    preset, setup, wall, cpu, note = row
    print(f"| {preset} | {setup} | {wall:.1f} | {cpu:.1f} | {note} |", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------- cache mechanisms (child)
def child(mode: str, preset: str, artifacts: str) -> None:
    """One fresh process: load the preset, compile + pre-warm the transformer, print the seconds."""
    import torch
    from zimage_server.config import EngineConfig
    from zimage_server.engine import accel, compile_cache
    from zimage_server.engine.engine import ZImageEngine

    config = EngineConfig(model=preset)
    engine = ZImageEngine.load(config)  # eager: compile below is what is timed
    compile_cache.mark_autocast_cacheable()  # as --compile-cache-dir does: lets the AOTAutograd cache engage
    if mode == "artifacts-load":
        torch.compiler.load_cache_artifacts(pathlib.Path(artifacts).read_bytes())
    before = compile_cache.cache_counts()
    started, cpu_started = time.monotonic(), _own_and_children_cpu()
    accel.compile_models(engine.pipe, EngineConfig(model=preset, compile=True))
    seconds, cpu = time.monotonic() - started, _own_and_children_cpu() - cpu_started
    after = compile_cache.cache_counts()
    if mode == "artifacts-save":
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise RuntimeError("torch.compiler.save_cache_artifacts recorded nothing")
        pathlib.Path(artifacts).write_bytes(saved[0])
    hits = (after.fx_hits - before.fx_hits) + (after.aot_hits - before.aot_hits)
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "cache_hits": hits}))


def _own_and_children_cpu() -> float:
    """This process's CPU time plus its finished children's (inductor runs the C++ compiler as children)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def mechanism(mode: str, preset: str, cache_dir: str, artifacts: str) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--presets", preset, "--artifacts", artifacts],
                         check=True, env=env, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_mechanisms(preset: str) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        artifacts = str(tmp_path / "artifacts.bin")
        cold = mechanism("artifacts-save", preset, str(tmp_path / "cold"), artifacts)  # fills "cold" too
        warm_dir = mechanism("dir", preset, str(tmp_path / "cold"), artifacts)
        loaded = mechanism("artifacts-load", preset, str(tmp_path / "empty"), artifacts)
        return {"cold": cold, "inductor_cache_dir": warm_dir, "cache_artifacts": loaded,
                "artifacts_bytes": pathlib.Path(artifacts).stat().st_size}


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,bench")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-mechanisms", action="store_true", help="skip the cache-mechanism comparison")
    parser.add_argument("--no-compile", action="store_true", help="only the floor, import and eager rows")
    parser.add_argument("--out", default=str(ROOT / "bench/results/startup.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.presets, args.artifacts)
        return

    results: dict[str, object] = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared)",
                                  "python": platform.python_version(), "load_average_before": os.getloadavg()}
    rows: list[Row] = []

    def med(samples: list[tuple[float, ...]]) -> tuple[float, ...]:
        return tuple(median([sample[i] for sample in samples]) for i in range(len(samples[0])))

    # Interleaved rounds (floor, import, each preset eager), so a change of load on a shared machine
    # moves all rows alike instead of whichever ran during it.
    presets = args.presets.split(",")
    floor_runs, import_runs, eager_runs = [], [], {p: [] for p in presets}
    for _ in range(args.repeats):
        floor_runs.append(timed([sys.executable, "-c", FLOOR]))
        import_runs.append(timed([sys.executable, "-c", SERVER_IMPORTS]))
        for preset in presets:
            eager_runs[preset].append(until_serving(["--model", preset])[:2])
    floor, floor_cpu = med(floor_runs)
    report(rows, ("floor", "import torch + ZImagePipeline", floor, floor_cpu, ""))
    imports, imports_cpu = med(import_runs)
    report(rows, ("import", "server modules", imports, imports_cpu,
                  f"floor {imports - floor:+.1f} s, {imports_cpu - floor_cpu:+.1f} CPU s"))
    for preset in presets:
        eager, eager_cpu = med(eager_runs[preset])
        report(rows, (preset, "eager", eager, eager_cpu,
                      f"floor {eager - floor:+.1f} s, {eager_cpu - floor_cpu:+.1f} CPU s"))
    for preset in presets if not args.no_compile else []:
        with tempfile.TemporaryDirectory() as cache:
            cold, cold_cpu, cold_line = until_serving(["--model", preset, "--compile", "--compile-cache-dir", cache])
            report(rows, (preset, "--compile, cold cache", cold, cold_cpu, cold_line.split(" in ")[0]))
            warm, warm_cpu, warm_line = until_serving(["--model", preset, "--compile", "--compile-cache-dir", cache])
            report(rows, (preset, "--compile, warm cache", warm, warm_cpu,
                          f"{warm / cold:.0%} of cold (wall), {warm_cpu / cold_cpu:.0%} (CPU); "
                          f"{warm_line.split(' in ')[0]}"))
    results["rows"] = [dict(preset=p, setup=s, wall_s=round(w, 2), cpu_s=round(c, 2), note=n)
                       for p, s, w, c, n in rows]
    results["load_average_after"] = os.getloadavg()
    if not args.no_mechanisms:
        mech = measure_mechanisms("tiny")
        results["mechanisms_tiny"] = mech
        print("\ncompile + pre-warm of the tiny transformer in a fresh process:\n")
        print("| cache | wall s | CPU s | graphs from cache |\n|---|---|---|---|")
        for name in ("cold", "inductor_cache_dir", "cache_artifacts"):
            m = mech[name]
            print(f"| {name} | {m['seconds']:.1f} | {m['cpu_s']:.1f} | {m['cache_hits']} |")
        print(f"\nartifacts file: {mech['artifacts_bytes'] / 1024:.0f} KiB")
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
