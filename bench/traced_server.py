"""``zimage-server`` under tracemalloc, for bench/soak.py --trace: memory snapshots on SIGUSR1.

Kept out of the server (no debug hooks there): this wrapper installs a SIGUSR1 handler and runs
``zimage_server.cli.main``. The first SIGUSR1 starts tracemalloc (soak.py sends it once the server is
SERVING: tracing the imports of torch and diffusers takes minutes). Each SIGUSR1 writes, as one pickle to
``$ZIMAGE_SOAK_TRACE_DIR/snap-N.pickle`` (N counts from 0, then renames ``.tmp`` so a reader never
sees half a file):

- the tracemalloc snapshot (Python-heap allocations by traceback, ``$ZIMAGE_SOAK_TRACE_FRAMES`` deep);
- the live objects by type (``gc.get_objects``), and the thread count;
- glibc's ``mallinfo2`` (heap bytes in use vs free-but-held: what tells a leak from fragmentation;
  zeros when the server runs jemalloc, which does not fill it).

    python bench/traced_server.py --model tiny ...   # the same flags as zimage-server
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import pathlib
import pickle
import signal
import sys
import threading
import tracemalloc


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mallinfo2() -> dict[str, int]:
    """glibc's heap statistics (bytes); {} where glibc < 2.33 or another libc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    info = fn()
    return {name: int(getattr(info, name)) for name, _ in _MallInfo2._fields_}


def _snapshot(out_dir: pathlib.Path, counter: list[int]) -> None:
    if not tracemalloc.is_tracing():
        # Tracing from the start makes importing torch and diffusers take minutes: the first signal
        # (sent once the server is SERVING) starts it, so only what serving allocates is traced.
        tracemalloc.start(int(os.environ.get("ZIMAGE_SOAK_TRACE_FRAMES", "8")))
    gc.collect()
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    data = {
        "tracemalloc": tracemalloc.take_snapshot(),
        "traced_bytes": tracemalloc.get_traced_memory()[0],
        "types": dict(types),
        "threads": threading.active_count(),
        "mallinfo2": mallinfo2(),
    }
    path = out_dir / f"snap-{counter[0]}.pickle"
    counter[0] += 1
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(data, f)
    os.replace(tmp, path)


def main() -> None:
    out_dir = pathlib.Path(os.environ["ZIMAGE_SOAK_TRACE_DIR"])
    counter = [0]
    # Python runs the handler on the main thread (the event loop's) between bytecodes: the snapshot
    # sees a consistent heap; the loop pauses for its duration.
    signal.signal(signal.SIGUSR1, lambda *_: _snapshot(out_dir, counter))
    from zimage_server.cli import main as server_main

    server_main(sys.argv[1:])


if __name__ == "__main__":
    main()
