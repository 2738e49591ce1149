"""LoRA adapters: a catalogue in ``--lora-dir``, an LRU cache of resident adapters, mixed-adapter forwards.

Size: over ~400 lines because the adapter catalogue, the LRU cache with pins and the mixed-forward
wrapper share one lifecycle (load, pin, evict, slot) that is easier to verify in one file.

Every ``*.safetensors`` file in the directory is one adapter, named by its file stem. diffusers'
``ZImageLoraLoaderMixin.lora_state_dict`` reads and converts it (diffusers/PEFT keys, the
``diffusion_model.`` prefix, kohya ``lora_down``/``lora_up`` + ``.alpha``, ``default.`` keys, the dotted
Anime-Z layout) and the scale of each layer is the one PEFT would give it (``lora_alpha / r``, rank and
alpha patterns, rsLoRA), from the same ``LoraConfig`` diffusers builds in ``load_lora_weights``.

Mixed forwards (Punica / S-LoRA's idea, for a diffusion transformer): each targeted ``nn.Linear`` of the
transformer is wrapped once, at start-up, in ``MixedLoraLinear``. The wrapper runs the base layer once on
the whole batch, then adds each adapter's low-rank delta ``(x @ A^T) @ B^T * scale`` to the rows of the
samples that asked for it, grouped by adapter: one pair of small matmuls per adapter present in the
forward, whatever the number of samples using it. Which samples use which adapter at which scale is the
``ForwardPlan`` the engine sets before each forward (``LoraRegistry.plan``).

Rows are samples. ``ZImageTransformer2DModel.forward`` takes lists of per-sample latents and caption
features, patchifies them, embeds the *concatenated* tokens (``all_x_embedder``, ``cap_embedder``: a
[tokens, dim] input with no sample axis), then pads them into [batch, seq, dim] for the refiners and the
main blocks, in the order of the input list. So every Linear inside the blocks (attention, feed-forward,
adaLN modulation), the timestep MLP (input [batch, 256]) and the final layer see sample i in row i of dim
0, and only those are wrapped; an adapter with a layer in the embedders is refused at load (its rows
are tokens of every sample at once, so it cannot be selected per sample).

Two ways to compute the deltas, picked by ``fixed_graph`` (``--compile``):

- grouped (eager): a Python loop over the adapters present in the forward, each on its runs of rows
  (views + in-place ``addmm_``). Shapes follow the mix, which is fine eagerly. With many adapters each on
  few rows (``GATHER_MIN_ADAPTERS`` or more, one adapter per sample) the per-adapter calls dominate, so the
  wrapper instead stacks the mix's adapters once (cached while the mix repeats, as it does across the
  steps of a step batch) and runs two batched matmuls over all rows, gathered by sample: 8 samples over
  8 adapters cost what one adapter costs (docs/lora.md).
- slots (compiled): each wrapper owns fixed-shape buffers ``A[slots, r_max, in]``, ``B[slots, out, r_max]``;
  a resident adapter occupies one slot (zero-padded to ``r_max``; layers it does not target stay zero).
  The plan is two tensors, slot index and scale per (sample, adapter position), shape
  [batch, max_loras_per_request]; the delta is a gather + two batched matmuls. The compiled graph sees
  the same shapes whatever the mix, so a new mix, a new adapter loaded into a slot, or an eviction
  recompiles nothing (the slot contents are tensor data, not guarded).

The cache: the directory is the catalogue (``available``); at most ``max_loaded`` adapters (and at most
``max_loaded_bytes``) are resident. A request pins its adapters from the moment it is queued
(``acquire``) until it ends (``release``); missing ones are read on a loader thread (file reading and
conversion never run on the engine thread) and installed into the wrappers there too: installing is
adding a dict entry or writing an unused slot, which no running forward reads. Least recently used
unpinned adapters are evicted to make room; a pinned one is never evicted or replaced, so an in-flight
request keeps the version it started with even across a reload that changes or removes its file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..errors import FailedPrecondition, NotFound, ZImageError
from ..types import AdapterInfo, LoraRef, LoraReloadReport

log = logging.getLogger(__name__)

# Request names are these characters (and a metrics label value: bounded by the files present).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SUFFIX = ".safetensors"
# "layers.3.attention.to_q" -> "attention.to_q": the module within its block.
_BLOCK_PREFIX = re.compile(r"^[A-Za-z_]+\.\d+\.")
# Modules whose input has no per-sample axis (the concatenated tokens of all samples): never wrapped.
_TOKEN_MAJOR = ("all_x_embedder.", "cap_embedder.", "siglip_embedder.", "siglip_refiner.")
# Grouped mode switches from one matmul pair per adapter to stacked batched matmuls at this many distinct
# adapters in a forward (each row with at most one): measured on the tiny preset, see docs/lora.md.
GATHER_MIN_ADAPTERS = 3
MAX_ROWS = 512  # samples per forward the compiled (slots) plan holds: far above any batch cap


class AdapterNotLoaded(LookupError):
    """An adapter named in a batch is not resident (a request ran without ``acquire``)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"LoRA adapter {name} is not resident")


class AdapterLoadError(ValueError):
    """A file could not be loaded as an adapter of this transformer; the message says why."""


# --------------------------------------------------------------------------- adapter weights
@dataclasses.dataclass(frozen=True)
class LayerDelta:
    """One adapter's low-rank update of one Linear: ``y += (x @ a.T) @ b.T * scaling * request_scale``."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float  # PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA)


@dataclasses.dataclass(frozen=True)
class AdapterWeights:
    """A parsed adapter, ready to install: its deltas by module path, and its ListLoras description."""

    info: AdapterInfo
    layers: dict[str, LayerDelta]


def read_adapter(path: pathlib.Path, name: str, linears: dict[str, tuple[int, int]], *,
                 dtype: torch.dtype, device: torch.device) -> AdapterWeights:
    """Read and convert one file, checking it against the wrappable Linears (path -> (in, out)).

    Pure: touches no model, so it runs on the loader thread while the engine steps. Raises
    AdapterLoadError with a message naming what is wrong.
    """
    from diffusers import ZImagePipeline
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    try:
        state, metadata = ZImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
        prefix = "transformer."
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if metadata is not None:
            metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or None
        if not state:
            raise ValueError("no key for the transformer (not a Z-Image LoRA?)")
        if any(".lokr_" in k for k in state):
            raise ValueError("LoKr adapters are not supported by mixed-adapter forwards (LoRA A/B only)")
        if any("lora_magnitude_vector" in k for k in state):
            raise ValueError("DoRA adapters are not supported by mixed-adapter forwards (LoRA A/B only)")
        if any(".lora_B." in k and k.endswith(".bias") for k in state):
            raise ValueError("LoRA with a bias on lora_B is not supported by mixed-adapter forwards")
        # The config diffusers' load_lora_adapter builds: the same per-layer scales as load_lora_weights.
        ranks = {f"^{k}": v.shape[1] for k, v in state.items() if ".lora_B." in k and v.ndim > 1}
        config = _create_lora_config(state, None, metadata, ranks)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:  # safetensors, diffusers, PEFT
        raise AdapterLoadError(f"{type(exc).__name__}: {_short(str(exc).replace(str(path), path.name))}") from exc
    modules = sorted({k.split(".lora_")[0] for k in state})
    layers: dict[str, LayerDelta] = {}
    for module in modules:
        a, b = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise AdapterLoadError(f"{module}: lora_A and lora_B weights must both be present")
        if module.startswith(_TOKEN_MAJOR):
            raise AdapterLoadError(f"{module}: adapters on the input embedders are not supported (their input is "
                                   "the tokens of every sample at once, so a mixed batch cannot select per sample)")
        if module not in linears:
            raise AdapterLoadError(f"{module}: no Linear layer of the transformer has this name")
        fan_in, fan_out = linears[module]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise AdapterLoadError(f"{module}: shapes A {tuple(a.shape)} B {tuple(b.shape)} do not fit the layer "
                                   f"({fan_in} -> {fan_out}); made for another model?")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        layers[module] = LayerDelta(a=a.to(device=device, dtype=dtype).contiguous(),
                                    b=b.to(device=device, dtype=dtype).contiguous(), scaling=float(scaling))
    size = sum(_nbytes(d.a) + _nbytes(d.b) for d in layers.values())
    info = AdapterInfo(name=name, rank=max(int(d.a.shape[0]) for d in layers.values()),
                       target_modules=tuple(sorted({_BLOCK_PREFIX.sub("", m) for m in layers})), size_bytes=size)
    return AdapterWeights(info=info, layers=layers)


# --------------------------------------------------------------------------- the forward
@dataclasses.dataclass(frozen=True)
class Group:
    """Rows of one forward that use one adapter (grouped mode), as runs of consecutive rows at one scale:
    each run is a view of the input and an in-place ``addmm_`` on a view of the output (no gather or
    scatter copies; measured 3-4x cheaper than ``index_select`` + ``index_add`` on the tiny preset)."""

    key: int  # the resident adapter's id
    runs: tuple[tuple[int, int, float], ...]  # (first row, end row, request scale)


@dataclasses.dataclass(frozen=True)
class Gathered:
    """Rows of one forward that each use one adapter, for a batched delta: every wrapper stacks the
    adapters' A and B once per mix (``keys``) and runs two ``bmm`` over all rows, instead of two small
    matmuls per adapter. Chosen when many adapters each have few rows (see ``GATHER_MIN_ADAPTERS``)."""

    keys: tuple[int, ...]  # the distinct adapters, in stacking order
    position: torch.Tensor  # [rows] long: row i uses keys[position[i]]
    scale: torch.Tensor  # [rows] float: row i's request scale (0 for a row without adapter)


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """Per-sample adapters of one forward, as the wrappers read it."""

    rows: int  # samples in the forward (dim 0 of every wrapped layer's input)
    groups: tuple[Group, ...] = ()  # grouped mode
    gathered: Gathered | None = None  # grouped mode, many adapters with one per row
    slot_index: torch.Tensor | None = None  # slots mode: [rows, k] long
    slot_scale: torch.Tensor | None = None  # slots mode: [rows, k] float

    @property
    def empty(self) -> bool:
        return not self.groups and self.gathered is None and self.slot_index is None


class PlanHolder:
    """The one mutable cell the wrappers share: the plan of the forward being run (engine thread only)."""

    def __init__(self) -> None:
        self.plan: ForwardPlan | None = None


class MixedLoraLinear(torch.nn.Module):
    """A Linear plus the per-sample low-rank deltas of the resident adapters that target it."""

    def __init__(self, base: torch.nn.Linear, path: str, holder: PlanHolder):
        super().__init__()
        self.base = base
        self.path = path
        self.holder = holder
        self.deltas: dict[int, LayerDelta] = {}  # grouped mode: resident adapter id -> its delta here
        # gathered plans: the stacked deltas of the last mix (adapter ids are never reused: no staleness)
        self._stack_keys: tuple[int, ...] | None = None
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None
        # slots mode: fixed-shape buffers (plain attributes, not registered buffers: not part of state_dict)
        self.slot_a: torch.Tensor | None = None  # [slots, r_max, in]
        self.slot_b: torch.Tensor | None = None  # [slots, out, r_max]

    @property
    def weight(self) -> torch.Tensor:  # code that reads layer.weight (dtype/device probes) sees the base's
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.holder.plan
        if plan is None:
            return y
        if self.slot_a is not None:
            if plan.slot_index is None:
                return y
            return y + self._slots_delta(x, plan).to(y.dtype)
        if not y.is_contiguous():
            y = y.contiguous()
        if plan.gathered is not None:
            return self._gathered_delta(x, y, plan.gathered)
        width = y.shape[-1]
        for group in plan.groups:
            delta = self.deltas.get(group.key)
            if delta is None:  # this adapter does not target this layer
                continue
            for start, stop, scale in group.runs:
                xs = x[start:stop]
                h = F.linear(xs.reshape(-1, xs.shape[-1]).to(delta.a.dtype), delta.a)  # [rows * tokens, r]
                ys = y[start:stop].view(-1, width)
                if ys.dtype == delta.b.dtype:
                    ys.addmm_(h, delta.b.t(), alpha=scale * delta.scaling)
                else:
                    ys += (F.linear(h, delta.b) * (scale * delta.scaling)).to(ys.dtype)
        return y

    def _stacked(self, keys: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A [K, r, in] and B * scaling [K, out, r] of ``keys`` here (zero for an adapter that does not
        target this layer or is no longer resident, zero-padded to the largest rank), cached for the last
        ``keys`` (the registry keeps them while forwards use a subset). None when none targets this layer."""
        if self._stack_keys == keys:
            return self._stack
        deltas = [self.deltas.get(k) for k in keys]
        present = [d for d in deltas if d is not None]
        if not present:
            stack = None
        else:
            r = max(d.a.shape[0] for d in present)
            first = present[0]
            a = first.a.new_zeros(len(keys), r, first.a.shape[1])
            b = first.b.new_zeros(len(keys), first.b.shape[0], r)
            for i, d in enumerate(deltas):
                if d is not None:
                    a[i, : d.a.shape[0]] = d.a
                    b[i, :, : d.a.shape[0]] = d.b * d.scaling
            stack = (a, b)
        self._stack_keys, self._stack = keys, stack
        return stack

    def _gathered_delta(self, x: torch.Tensor, y: torch.Tensor, gathered: Gathered) -> torch.Tensor:
        stack = self._stacked(gathered.keys)
        if stack is None:
            return y
        a, b = stack
        n = x.shape[0]
        flat = x.reshape(n, -1, x.shape[-1]).to(a.dtype)  # [n, tokens, in]
        h = torch.bmm(flat, a[gathered.position].transpose(1, 2))  # [n, tokens, r]
        h = h * gathered.scale.to(h.dtype)[:, None, None]
        ys = y.view(n, -1, y.shape[-1])
        if ys.dtype == b.dtype:
            ys.baddbmm_(h, b[gathered.position].transpose(1, 2))
        else:
            ys += torch.bmm(h, b[gathered.position].transpose(1, 2)).to(ys.dtype)
        return y

    def _slots_delta(self, x: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        """sum_k scale[n,k] * B[idx[n,k]] @ A[idx[n,k]] @ x[n]: fixed shapes whatever the mix (compiled)."""
        n = x.shape[0]
        index, scale = plan.slot_index[:n], plan.slot_scale[:n]  # [n, k]
        flat = x.reshape(n, -1, x.shape[-1]).to(self.slot_a.dtype)  # [n, t, in]
        a = self.slot_a[index]  # [n, k, r, in]
        b = self.slot_b[index]  # [n, k, out, r]
        h = torch.einsum("nti,nkri->nktr", flat, a) * scale[:, :, None, None]
        out = torch.einsum("nktr,nkor->nto", h, b)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def wrappable_linears(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linears whose input has the sample on dim 0 (see the module docstring), by path."""
    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.startswith(_TOKEN_MAJOR)}


def _wrap(transformer: torch.nn.Module, holder: PlanHolder) -> dict[str, MixedLoraLinear]:
    wrappers = {}
    for path, linear in wrappable_linears(transformer).items():
        parent_name, _, child = path.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        wrapper = MixedLoraLinear(linear, path, holder)
        setattr(parent, child, wrapper)
        wrappers[path] = wrapper
    return wrappers


# --------------------------------------------------------------------------- the registry / cache
@dataclasses.dataclass(frozen=True)
class _File:
    path: pathlib.Path
    stamp: tuple[int, int]  # (mtime_ns, size): a changed file is loaded again


@dataclasses.dataclass
class _Resident:
    key: int
    name: str
    weights: AdapterWeights
    stamp: tuple[int, int]
    slot: int = -1  # slots mode
    stale: bool = False  # its file changed or went away: dropped once no request holds it


@dataclasses.dataclass
class _Hold:
    """The adapters one request holds: names, and the resident versions once all are there."""

    names: tuple[str, ...]
    keys: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> resident key, pinned
    error: ZImageError | None = None  # an adapter cannot be had: the request fails with it instead of waiting

    @property
    def ready(self) -> bool:
        return len(self.keys) == len(self.names)


class LoraObserver:
    """Metric hooks (the app passes one backed by Prometheus); the default does nothing."""

    def loaded(self, seconds: float) -> None: ...
    def evicted(self) -> None: ...
    def resident(self, count: int, size_bytes: int) -> None: ...
    def forward(self, distinct: int) -> None: ...


class LoraRegistry:
    """The adapters of one transformer; see the module docstring.

    Threads: ``acquire``/``release``/``ready``/``names``/``adapters``/``reload`` from any thread (one
    lock); ``plan`` from the engine thread; loads on its own loader thread, which calls ``on_ready``
    (the app wakes the scheduler with it) after each one.
    """

    def __init__(self, transformer: torch.nn.Module, directory: str | pathlib.Path, *, max_loaded: int = 8,
                 max_loaded_bytes: int = 0, fixed_graph: bool = False, max_per_request: int = 4,
                 max_rank: int = 64, observer: LoraObserver | None = None):
        self.directory = pathlib.Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"--lora-dir {directory}: not a directory; create it or point the flag at one")
        if max_loaded < 1:
            raise ConfigError(f"--max-loaded-loras must be at least 1 (got {max_loaded})")
        self._transformer = transformer
        self.fixed_graph = fixed_graph
        self.max_loaded = max_loaded
        self.max_loaded_bytes = max_loaded_bytes
        self.max_per_request = max_per_request
        self.max_rank = max_rank
        self.observer = observer or LoraObserver()
        self.on_ready: Callable[[], None] | None = None
        self._holder = PlanHolder()
        # The adapters the wrappers have stacked (gathered plans): kept while each forward's mix is a subset
        # of it, so a step batch whose requests come and go does not restack every wrapper at each change.
        self._stack_keys: tuple[int, ...] = ()
        self._wrappers = _wrap(transformer, self._holder)
        self._shapes = {p: (w.base.in_features, w.base.out_features) for p, w in self._wrappers.items()}
        param = next(transformer.parameters())
        self._dtype = param.dtype if param.is_floating_point() else torch.float32
        self._device = param.device
        if fixed_graph:  # slot 0 stays zero: the padding of samples with fewer adapters than max_per_request
            for w in self._wrappers.values():
                fan_in, fan_out = self._shapes[w.path]
                w.slot_a = torch.zeros(max_loaded + 1, max_rank, fan_in, dtype=self._dtype, device=self._device)
                w.slot_b = torch.zeros(max_loaded + 1, fan_out, max_rank, dtype=self._dtype, device=self._device)
            # One plan object and two tensors for the server's life, rewritten in place before each forward:
            # the compiled graphs see the same objects and shapes whatever the mix (nothing to guard on).
            self._holder.plan = ForwardPlan(
                rows=MAX_ROWS, slot_index=torch.zeros(MAX_ROWS, max_per_request, dtype=torch.long, device=self._device),
                slot_scale=torch.zeros(MAX_ROWS, max_per_request, dtype=self._dtype, device=self._device))
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._known: dict[str, tuple[tuple[int, int], AdapterInfo]] = {}  # description of the last version loaded
        self._failed: dict[str, tuple[tuple[int, int], str]] = {}  # name -> (stamp, error): not retried unchanged
        self._resident: collections.OrderedDict[int, _Resident] = collections.OrderedDict()  # LRU first
        self._current: dict[str, int] = {}  # name -> key of its current (not stale) resident version
        self._pins: collections.Counter[int] = collections.Counter()
        self._holds: dict[str, _Hold] = {}  # request id -> hold
        self._loading: set[str] = set()
        self._wanted: list[str] = []  # names waiting for a load, oldest first
        self._ids = itertools.count(1)
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zimage-lora-load")
        self.loads = 0
        self.evictions = 0

    # ------------------------------------------------------------------ catalogue
    def names(self) -> frozenset[str]:
        """Names a request may use: the adapter files found by the last scan."""
        return frozenset(self._files)

    def adapters(self) -> list[AdapterInfo]:
        """Every requestable adapter, sorted by name: resident or not, described as far as known."""
        with self._lock:
            out = []
            for name, file in sorted(self._files.items()):
                known = self._known.get(name)
                info = known[1] if known is not None and known[0] == file.stamp else AdapterInfo(name, 0, (), 0)
                out.append(dataclasses.replace(info, resident=name in self._current))
            return out

    def available(self) -> list[str]:
        """Every requestable adapter name, sorted."""
        return sorted(self._files)

    def resident_names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._current)

    def reload(self) -> LoraReloadReport:
        """Rescan the directory. New files become requestable; a changed or removed file's resident version
        is dropped (now, or when the last request holding it ends). Loading waits for first use."""
        errors: list[str] = []
        found: dict[str, _File] = {}
        try:
            paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
        except OSError as exc:
            paths = []
            errors.append(f"{self.directory}: cannot list the directory: {exc}")
        for path in paths:
            name = path.name[: -len(SUFFIX)]
            if not NAME_PATTERN.match(name):
                errors.append(f"{path.name}: skipped: an adapter name (the file name without {SUFFIX}) must be "
                              f"1-64 of A-Z a-z 0-9 . _ -")
                continue
            try:
                stat = path.stat()
            except OSError as exc:  # removed while we scanned
                errors.append(f"{path.name}: {exc.strerror}")
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            known = self._files.get(name)
            if known is None or known.stamp != stamp:
                problem = _check_header(path)
                if problem:  # not requestable; the full check (shapes, layout) happens at its first load
                    errors.append(f"{path.name}: {problem}")
                    continue
            found[name] = _File(path, stamp)
        with self._lock:
            for name, failure in list(self._failed.items()):
                if name not in found or found[name].stamp != failure[0]:
                    del self._failed[name]  # changed or gone: try again on next use
                else:
                    errors.append(failure[1])
            for name, key in list(self._current.items()):
                if name not in found or found[name].stamp != self._resident[key].stamp:
                    self._resident[key].stale = True
                    del self._current[name]
                    self._drop_if_free(key)
            self._files = found
            for hold in self._holds.values():
                gone = [i for i, n in enumerate(hold.names) if n not in found and not hold.ready]
                if gone:  # not loaded for it yet and now never will be: fail it rather than let it wait
                    hold.error = _removed(gone[0], hold.names[gone[0]])
        if self.on_ready is not None:
            self.on_ready()
        for error in errors:
            log.error("LoRA %s", error)
        return LoraReloadReport(adapters=tuple(self.adapters()), errors=tuple(errors))

    def preload(self, names: Iterable[str] | None = None) -> list[str]:
        """Load adapters now, synchronously, up to the cache size (start-up and tests); returns errors."""
        errors = []
        for name in sorted(self._files) if names is None else names:
            with self._lock:
                if name in self._current or len(self._resident) >= self.max_loaded:
                    continue
                self._loading.add(name)
            self._load(name)
            with self._lock:
                if name not in self._current and name in self._failed:
                    errors.append(self._failed[name][1])
        return errors

    # ------------------------------------------------------------------ holding
    def acquire(self, request_id: str, loras: Sequence[LoraRef]) -> bool:
        """Pin the request's adapters (loading the missing ones in the background); True if all are resident.

        A name whose file is gone (a reload since validation) makes ``failure`` report it. Call ``release``
        when the request ends, whatever its outcome.
        """
        names = tuple(ref.name for ref in loras)
        with self._lock:
            hold = _Hold(names)
            self._holds[request_id] = hold
            missing = [i for i, n in enumerate(names) if n not in self._files and n not in self._current]
            if missing:
                hold.error = _removed(missing[0], names[missing[0]])
                return False
            self._try_pin(hold)
            if not hold.ready:
                for name in names:
                    if name not in self._current and name not in self._loading and name not in self._wanted:
                        self._wanted.append(name)
                self._start_loads()
            return hold.ready

    def ready(self, request_id: str) -> bool:
        """Whether every adapter of an acquired request is resident (and pinned)."""
        hold = self._holds.get(request_id)
        return hold is None or hold.ready

    def waiting(self) -> int:
        """Requests waiting for an adapter load."""
        with self._lock:
            return sum(1 for h in self._holds.values() if not h.ready)

    def release(self, request_id: str) -> None:
        """Unpin a request's adapters (its end). Unknown ids are ignored."""
        with self._lock:
            hold = self._holds.pop(request_id, None)
            if hold is None:
                return
            for key in hold.keys.values():
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]
                    self._drop_if_free(key)
            self._start_loads()

    def _try_pin(self, hold: _Hold) -> None:
        """Pin all of a hold's adapters at once, or none (a half-pinned request could deadlock the cache)."""
        if hold.ready or any(n not in self._current for n in hold.names):
            return
        for name in hold.names:
            key = self._current[name]
            hold.keys[name] = key
            self._pins[key] += 1
            self._resident.move_to_end(key)

    def _drop_if_free(self, key: int) -> None:
        entry = self._resident.get(key)
        if entry is not None and entry.stale and not self._pins.get(key):
            self._uninstall(entry)

    def _start_loads(self) -> None:
        """Start the wanted loads there is room for (lock held): evict LRU unpinned adapters as needed."""
        while self._wanted:
            name = self._wanted[0]
            if name not in self._files:
                self._wanted.pop(0)
                continue
            size = self._files[name].stamp[1]
            if not self._make_room(size):
                return
            self._wanted.pop(0)
            self._loading.add(name)
            self._loader.submit(self._load_and_notify, name)

    def _make_room(self, size: int) -> bool:
        wanted = {n for h in self._holds.values() if not h.ready for n in h.names}
        while True:
            count = len(self._resident) + len(self._loading)
            used = sum(e.weights.info.size_bytes for e in self._resident.values())
            if count < self.max_loaded and (not self.max_loaded_bytes or used + size <= self.max_loaded_bytes
                                            or not self._resident):
                return True
            free = [e for e in self._resident.values() if not self._pins.get(e.key)]
            if not free:
                return False
            # LRU among the unpinned, sparing those a waiting request also needs.
            victim = next((e for e in free if e.name not in wanted), free[0])
            self._uninstall(victim)
            self.evictions += 1
            self.observer.evicted()
            log.info("LoRA %s evicted (least recently used)", victim.name)

    def _load_and_notify(self, name: str) -> None:
        try:
            self._load(name)
        finally:
            if self.on_ready is not None:
                self.on_ready()

    def _load(self, name: str) -> None:
        """Read one adapter and install it (loader thread, or the caller's in ``preload``)."""
        started = time.monotonic()
        file = self._files.get(name)
        try:
            if file is None:
                raise AdapterLoadError("its file is gone")
            weights = read_adapter(file.path, name, self._shapes, dtype=self._dtype, device=self._device)
            if self.fixed_graph and weights.info.rank > self.max_rank:
                raise AdapterLoadError(f"rank {weights.info.rank} is above --max-lora-rank {self.max_rank} "
                                       "(the compiled slots' size)")
        except AdapterLoadError as exc:
            error = f"{file.path.name if file else name}: {exc}"
            log.error("LoRA %s", error)
            with self._lock:
                self._loading.discard(name)
                if file is not None:
                    self._failed[name] = (file.stamp, error)
                self._fail_holds(name, error)
                self._start_loads()
            return
        seconds = time.monotonic() - started
        with self._lock:
            self._loading.discard(name)
            entry = _Resident(key=next(self._ids), name=name, weights=weights, stamp=file.stamp)
            self._install(entry)
            if self._files.get(name) is None or self._files[name].stamp != file.stamp:
                entry.stale = True  # reloaded while we read it: this version is already out of date
                self._wanted.append(name)
            else:
                self._current[name] = entry.key
            self._known[name] = (file.stamp, weights.info)
            for hold in self._holds.values():
                self._try_pin(hold)
            self._drop_if_free(entry.key)
            self.loads += 1
            self._start_loads()
        self.observer.loaded(seconds)
        log.info("LoRA %s loaded from %s in %.3f s (rank %d, %d bytes)", name, file.path.name, seconds,
                 weights.info.rank, weights.info.size_bytes)

    def _fail_holds(self, name: str, error: str) -> None:
        """A load failed: the requests waiting for it fail (the scheduler asks ``failure``), not wait forever."""
        for request_id, hold in self._holds.items():
            if name in hold.names and not hold.ready:
                hold.error = FailedPrecondition(f"loras[{hold.names.index(name)}].name",
                                                f"LoRA adapter {name} could not be loaded: {error}")

    def failure(self, request_id: str) -> ZImageError | None:
        """Why a waiting request's adapter could not be loaded, if it could not."""
        hold = self._holds.get(request_id)
        return None if hold is None or hold.ready else hold.error

    # ------------------------------------------------------------------ installing (lock held)
    def _install(self, entry: _Resident) -> None:
        if self.fixed_graph:
            used = {e.slot for e in self._resident.values()}
            entry.slot = next(s for s in range(1, self.max_loaded + 1) if s not in used)
            for path, w in self._wrappers.items():
                delta = entry.weights.layers.get(path)
                w.slot_a[entry.slot].zero_()
                w.slot_b[entry.slot].zero_()
                if delta is not None:  # scaling folded into B: the slot path has no per-layer scale vector
                    r = delta.a.shape[0]
                    w.slot_a[entry.slot, :r].copy_(delta.a)
                    w.slot_b[entry.slot, :, :r].copy_(delta.b * delta.scaling)
        else:
            for path, delta in entry.weights.layers.items():
                self._wrappers[path].deltas[entry.key] = delta
        self._resident[entry.key] = entry
        self._report_resident()

    def _uninstall(self, entry: _Resident) -> None:
        if not self.fixed_graph:
            for path in entry.weights.layers:
                self._wrappers[path].deltas.pop(entry.key, None)
        # (a freed slot keeps its old values until reused: no plan points at it)
        del self._resident[entry.key]
        if self._current.get(entry.name) == entry.key:
            del self._current[entry.name]
        self._report_resident()

    def _report_resident(self) -> None:
        self.observer.resident(len(self._resident), sum(e.weights.info.size_bytes for e in self._resident.values()))

    # ------------------------------------------------------------------ forwards
    def plan(self, rows: Sequence[tuple[str, Sequence[LoraRef]]]) -> int:
        """Set the plan of the next forward: per row (sample), its request id and adapters. Returns the
        number of distinct adapters in it. Engine thread; raises AdapterNotLoaded for an adapter the
        request does not hold."""
        keys_by_row: list[list[tuple[int, float]]] = []
        for request_id, loras in rows:
            hold = self._holds.get(request_id)
            row = []
            for ref in loras:
                key = hold.keys.get(ref.name) if hold is not None else self._current.get(ref.name)
                if key is None or key not in self._resident:
                    raise AdapterNotLoaded(ref.name)
                if ref.scale != 0.0:
                    row.append((key, ref.scale))
            keys_by_row.append(row)
        distinct = {k for row in keys_by_row for k, _ in row}
        if self.fixed_graph:
            self._write_slots(keys_by_row)
        elif not distinct:
            self._holder.plan = None
        elif len(distinct) >= GATHER_MIN_ADAPTERS and all(len(row) <= 1 for row in keys_by_row):
            if not distinct <= set(self._stack_keys):
                self._stack_keys = tuple(sorted(distinct))
            keys = self._stack_keys
            where = {k: i for i, k in enumerate(keys)}
            position = torch.tensor([where[row[0][0]] if row else 0 for row in keys_by_row], dtype=torch.long)
            scale = torch.tensor([row[0][1] if row else 0.0 for row in keys_by_row], dtype=torch.float32)
            self._holder.plan = ForwardPlan(rows=len(rows), gathered=Gathered(keys, position.to(self._device),
                                                                             scale.to(self._device)))
        else:
            groups = []
            for key in sorted(distinct):
                runs: list[list] = []
                for i, row in enumerate(keys_by_row):
                    for k, scale in row:
                        if k != key:
                            continue
                        if runs and runs[-1][1] == i and runs[-1][2] == scale:
                            runs[-1][1] = i + 1
                        else:
                            runs.append([i, i + 1, scale])
                groups.append(Group(key=key, runs=tuple((a, b, float(s)) for a, b, s in runs)))
            self._holder.plan = ForwardPlan(rows=len(rows), groups=tuple(groups))
        self.observer.forward(len(distinct))
        return len(distinct)

    def _write_slots(self, keys_by_row: list[list[tuple[int, float]]]) -> None:
        if len(keys_by_row) > MAX_ROWS:
            raise ValueError(f"a forward of {len(keys_by_row)} samples exceeds the LoRA plan's {MAX_ROWS} rows")
        k = self.max_per_request
        index = torch.zeros(MAX_ROWS, k, dtype=torch.long)
        scale = torch.zeros(MAX_ROWS, k, dtype=self._dtype)
        for i, row in enumerate(keys_by_row):
            for j, (key, s) in enumerate(row):
                index[i, j] = self._resident[key].slot
                scale[i, j] = s
        plan = self._holder.plan
        plan.slot_index.copy_(index)
        plan.slot_scale.copy_(scale)

    def clear_plan(self) -> None:
        if not self.fixed_graph:
            self._holder.plan = None

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


def _removed(index: int, name: str) -> NotFound:
    return NotFound(f"loras[{index}].name", name, "LoRA adapter (removed by a reload before it was loaded)")


def _check_header(path: pathlib.Path) -> str:
    """A cheap scan-time check (the safetensors header only, no tensor read): '' if it may be an adapter."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())  # (safetensors also checks here that the offsets cover the file: truncation)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        return f"not a readable safetensors file ({type(exc).__name__}: {_short(str(exc), 120)})"
    if not any(("lora" in k.lower() or ".lokr_" in k or k.endswith(".alpha")) for k in keys):
        return "no LoRA weights in the file (no lora_A/lora_B, lora_down/lora_up key)"
    return ""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
