"""The persistent compile cache behind ``--compile-cache-dir``: what one start saves so the next skips compiling.

Lifecycle, once per process (without --compile-cache-dir, steps 1 and 2 are skipped and 3 logs nothing):

1. ``use_compile_cache`` (the app, before anything compiles) points inductor's FX graph cache and
   AOTAutograd's cache at ``<dir>/inductor``, marks the autocast calls of diffusers' blocks cacheable
   (``AUTOCAST_CACHEABLE``) and answers whether the directory already held compiled graphs.
2. ``accel.compile_models`` asks ``can_precompile``; for the plain float transformer, ``PrecompiledBlocks``
   loads the saved graphs of its repeated block from ``precompiled_dir`` (``<dir>/precompiled/<key>``; the
   key hashes the torch, diffusers, Python and format versions, the CPU's vector ISA or the GPU's name, the
   block's class and a hash of its source file, the transformer's configuration, dtype and attention backend)
   with ``torch.compiler.load_compiled_function``, and compiles a variant it lacks with
   ``torch.compile(...).aot_compile``, saving it beside them. LoRA, quantized or hooked blocks keep the
   regular regional compile, served by the inductor and AOTAutograd caches of the same directory.
3. ``cache_counts`` before and after the load and warm-up, then ``log_compile_cache``, turn dynamo's
   counters into one log line: compile cache HIT, PARTIAL HIT or MISS (``CompileCacheReport``).

A stale precompiled graph is never used: anything in the key that changes gives a fresh directory, and what the key
leaves out (shapes, dtypes, devices, module attributes) is checked by each graph's guards at each call.
``accel`` (compile, quantization, attention, offload) imports this module, never the reverse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..config import ConfigError, EngineConfig

if TYPE_CHECKING:
    from diffusers import ZImagePipeline

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- counts and report
def log_compile_cache(config: EngineConfig, before: CacheCounts,
                      had_entries: bool = True) -> CompileCacheReport | None:
    """Log whether the compilation since ``before`` (see ``cache_counts``) was served by --compile-cache-dir."""
    if not (config.compile and config.compile_cache_dir):
        return None
    delta = CacheCounts(*(a - b for a, b in zip(cache_counts(), before, strict=True)))
    report = CompileCacheReport(config.compile_cache_dir, delta, had_entries)
    if delta.block_loaded or delta.block_compiled:
        what = (f"{delta.block_loaded} of {delta.block_loaded + delta.block_compiled} precompiled block graphs "
                "loaded (dynamo, AOTAutograd and inductor all skipped)")
        if delta.fx_hits or delta.fx_misses:  # --compile-vae: the decoder goes through the inductor caches
            what += f", {delta.fx_hits} of {delta.fx_hits + delta.fx_misses} other inductor graphs from the cache"
    else:
        what = (f"{delta.fx_hits} of {delta.fx_hits + delta.fx_misses} inductor graphs and {delta.aot_hits} of "
                f"{delta.aot_hits + delta.aot_misses} AOT graphs from the cache")
    log.info("compile cache %s in %s: %s%s", report.verdict.upper(), report.directory, what,
             "" if report.verdict == "hit" else "; the rest were compiled and saved for the next start")
    return report


class CacheCounts(NamedTuple):
    """Process-wide counts of compiled graphs by where they came from (``cache_counts``)."""

    fx_hits: int = 0
    fx_misses: int = 0
    aot_hits: int = 0
    aot_misses: int = 0
    block_loaded: int = 0  # precompiled block graphs loaded from --compile-cache-dir
    block_compiled: int = 0  # block graphs compiled in this process (and saved there)


@dataclasses.dataclass(frozen=True)
class CompileCacheReport:
    """How the compile caches answered during one compilation (counts of graphs)."""

    directory: str
    counts: CacheCounts
    had_entries: bool = True  # the directory held compiled graphs when this start began

    @property
    def verdict(self) -> str:
        c = self.counts
        hits, misses = c.fx_hits + c.aot_hits + c.block_loaded, c.fx_misses + c.aot_misses + c.block_compiled
        if hits and not misses:
            return "hit"
        # From an empty directory, hits are repeats of graphs compiled earlier in this same start
        # (identical block graphs): still a cold start.
        return "partial hit" if hits and self.had_entries else "miss"


# --------------------------------------------------------------------------- cache directory
# diffusers' Z-Image blocks wrap RoPE in ``torch.amp.autocast("cuda", enabled=False)``, which dynamo records
# as these two calls; AOTAutograd's cache refuses any graph holding a function it does not know ("Bypassing
# autograd cache due to: Unsupported call_function target _enter_autocast"), so without this entry it never
# engaged, and the precompiled blocks (which require that cache) could not be built. Marking them is safe:
# their arguments (device type, dtype, enabled) are constants of the graph text the cache key hashes.
AUTOCAST_CACHEABLE = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


def use_compile_cache(directory: str) -> bool:
    """Keep compiled artifacts in ``directory``: the precompiled transformer blocks (``precompiled/``, see
    ``PrecompiledBlocks``) and inductor's own caches (``inductor/``: FX graph cache, AOTAutograd cache, and
    the C++ kernels the precompiled blocks load).

    inductor reads its cache location from ``TORCHINDUCTOR_CACHE_DIR`` at each use, so it is set
    here, in the server process, before the first compile. Returns whether it already held graphs.
    """
    import os

    root = pathlib.Path(directory).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--compile-cache-dir {directory}: cannot create it ({exc})") from exc
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    mark_autocast_cacheable()
    return any((root / "inductor" / "fxgraph").glob("*/*")) or any((root / "precompiled").glob("*/*.bin"))


def mark_autocast_cacheable() -> None:
    """See AUTOCAST_CACHEABLE (keyed by the torch version, as inductor's config asks)."""
    marked = dict(torch._inductor.config.unsafe_marked_cacheable_functions)
    marked.update({name: torch.__version__ for name in AUTOCAST_CACHEABLE})
    torch._inductor.config.unsafe_marked_cacheable_functions = marked


def cache_counts() -> CacheCounts:
    """The process-wide counts now; the difference of two readings counts one compilation's graphs."""
    from torch._dynamo.utils import counters

    return CacheCounts(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"],
                       counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_miss"],
                       counters["zimage"]["precompiled_block_loaded"], counters["zimage"]["precompiled_block_compiled"])


# --------------------------------------------------------------------------- precompiled blocks
PRECOMPILE_FORMAT = 1  # bump when what is saved, or how it is keyed, changes


def can_precompile(transformer: torch.nn.Module, config: EngineConfig) -> bool:
    """Precompiled blocks cover the plain float model. LoRA slot wrappers and quantized (tensor-subclass)
    weights keep the regular regional compile, served by the inductor/AOTAutograd caches of the same
    directory; so do blocks carrying module hooks (the saved graphs are of ``forward`` alone)."""
    if config.lora_dir or config.quantize != "none":
        return False
    blocks = [m for m in transformer.modules() if m.__class__.__name__ in transformer._repeated_blocks]
    return bool(blocks) and not any(b._forward_hooks or b._forward_pre_hooks for b in blocks)


def precompiled_dir(pipe: ZImagePipeline, config: EngineConfig) -> pathlib.Path:
    """``<cache dir>/precompiled/<key>``: the key covers everything the saved graphs depend on besides what
    their guards check at each call (tensor shapes, dtypes, devices, module attributes): torch, diffusers,
    Python and this format's versions, the CPU's vector ISA or the GPU, the block's class and source file,
    the transformer's configuration, dtype, device and attention backend. Weights are inputs of the graphs,
    not part of them, so a fine-tune of the same architecture reuses the directory; anything else in the key
    changed gives a fresh directory, never a stale graph."""
    import platform
    import sys

    import diffusers

    transformer = pipe.transformer
    block_cls = next(m for m in transformer.modules()
                     if m.__class__.__name__ in transformer._repeated_blocks).__class__
    device = transformer.device
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu {torch.backends.cpu.get_cpu_capability()}")
    source = pathlib.Path(sys.modules[block_cls.__module__].__file__ or "")
    identity = {
        "format": PRECOMPILE_FORMAT, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "device": device_name,
        "block": f"{block_cls.__module__}.{block_cls.__qualname__}",
        "block_source": hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else "",
        # Private entries (diffusers' "_use_default_values", built from a set) vary in order between processes.
        "transformer": {k: v for k, v in transformer.config.items() if not k.startswith("_")},
        "dtype": str(transformer.dtype), "attention": config.attention,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return pathlib.Path(config.compile_cache_dir).expanduser().resolve() / "precompiled" / digest


def _serializable_guards(entries: Any) -> list[bool]:
    """Which dynamo guards a precompiled block keeps. Dropped: guards on globals (module objects, builtins,
    diffusers' attention registry: fixed by the versions in the directory key) and the identity guards on
    the attention processor's ``__call__`` function object, which cannot be saved and would differ in the
    next process anyway. Kept: every guard on the block's inputs, parameters, buffers and attributes."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [not (e.is_global or e.guard_type in unsupported or any(d in unsupported for d in e.derived_guard_types))
            for e in entries]


class PrecompiledBlocks:
    """Compiled graphs of the transformer's repeated block, saved to and loaded from a directory, so a warm
    start runs none of dynamo's tracing, AOTAutograd or inductor (``torch.compile(...).aot_compile`` and
    ``torch.compiler.load_compiled_function``, torch's precompile API).

    The FX graph and AOTAutograd caches alone left a warm start at 75-82% of a cold one on this model:
    they skip code generation, but dynamo and AOTAutograd still re-trace every block variant each start.

    One list of graphs serves every block instance (weights are graph inputs). ``install`` makes each
    block's call try the graphs whose guards accept its arguments (the last one that matched first, as
    consecutive calls mostly share a variant) and, when none does, compile a new variant with dynamo
    exactly as a recompile would, append it and save it. So the pre-warm fills a cold directory, a warm
    start loads it, and a variant met only under traffic is compiled once and kept for the next start.
    """

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self.graphs: list[Any] = []  # torch._dynamo.aot_compile.AOTCompiledFunction

    def load(self) -> int:
        """Load every saved graph of this key; an unreadable file (torch changed under the same key, a
        truncated write) is skipped with a warning and compiled again. Returns how many loaded."""
        from torch._dynamo.utils import counters

        for path in sorted(self.directory.glob("*.bin")):
            try:
                with path.open("rb") as fh:
                    graph = torch.compiler.load_compiled_function(fh)
            except Exception as exc:  # any failure to deserialize only costs a compile
                log.warning("precompiled block %s not loaded (%s: %s); it will be compiled again",
                            path, type(exc).__name__, exc)
                continue
            graph.disable_guard_check()  # checked in call(), once
            self.graphs.append(graph)
            counters["zimage"]["precompiled_block_loaded"] += 1
        return len(self.graphs)

    def install(self, transformer: torch.nn.Module) -> None:
        """Route every repeated block's call through ``call`` (the hook ``nn.Module.compile`` itself uses)."""
        for block in transformer.modules():
            if block.__class__.__name__ in transformer._repeated_blocks:
                block._compiled_call_impl = _BlockCall(self, block)

    def call(self, block: torch.nn.Module, last: int, args: tuple, kwargs: dict) -> tuple[int, Any]:
        """(index of the graph used, its output) for one block call."""
        if torch.is_grad_enabled():  # the graphs are inference graphs (the engine runs under no_grad)
            return last, block._call_impl(*args, **kwargs)
        graphs = self.graphs
        for i in range(len(graphs)):
            j = (last + i) % len(graphs)
            if graphs[j].guard_check(block, *args, **kwargs):
                return j, graphs[j](block, *args, **kwargs)
        graph = self._compile(block, args, kwargs)
        return len(graphs) - 1, graph(block, *args, **kwargs)

    def _compile(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        from torch._dynamo.utils import counters

        compiler = torch.compile(type(block).forward, fullgraph=True, dynamic=True,
                                 options={"guard_filter_fn": _serializable_guards})
        mark_autocast_cacheable()
        # specialize_float: a float that dynamo cannot keep symbolic makes it restart the analysis, which
        # torch.compile does by itself but aot_compile does not; specialising from the start is what the
        # restart would do.
        with torch._dynamo.config.patch(specialize_float=True):
            graph = compiler.aot_compile(((block, *args), kwargs))
        graph.disable_guard_check()
        self.graphs.append(graph)
        counters["zimage"]["precompiled_block_compiled"] += 1
        try:
            data = type(graph).serialize(graph).serialized_data
            self.directory.mkdir(parents=True, exist_ok=True)
            # Named by content, written beside and renamed: replicas sharing a volume never clobber a file.
            path = self.directory / f"{hashlib.sha256(data).hexdigest()[:20]}.bin"
            tmp = self.directory / f".{path.name}.{id(graph)}.tmp"
            tmp.write_bytes(data)
            tmp.replace(path)
        except Exception:  # the cache is optional: a full disk or a graph torch cannot save costs only time
            log.warning("could not save a precompiled block to %s", self.directory, exc_info=True)
        return graph


class _BlockCall:
    """One block's compiled call: remembers which graph matched last."""

    def __init__(self, blocks: PrecompiledBlocks, block: torch.nn.Module):
        self.blocks, self.block, self.last = blocks, block, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.last, out = self.blocks.call(self.block, self.last, args, kwargs)
        return out
