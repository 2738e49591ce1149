"""LoRA adapters: discovered in ``--lora-dir``, loaded once, switched between forwards.

Every ``*.safetensors`` file in the directory is one adapter, named by its file stem.
diffusers' ``ZImageLoraLoaderMixin`` reads it, so the layouts its loader converts are
accepted as they are: diffusers/PEFT (``transformer.<module>.lora_A.weight``), the
``diffusion_model.`` prefix, kohya (``lora_unet_<module>.lora_down.weight`` + ``.alpha``),
``default.`` keys and the dotted Anime-Z layout. A file that fails to load is reported
and skipped; the adapters already loaded stay as they were.

The adapters live as PEFT layers beside the base weights and are never fused, so the base
weights are never changed. ``activate`` sets the adapter set of the next forwards with
PEFT's ``set_adapters`` (which adapters are active, each layer's scale): python-side state,
no weights move. It does nothing when the set is already active, so a run of batches with
the same adapters pays nothing.

Two modes:

- eager (``fixed_graph=False``): only the requested adapters run; an empty set disables
  the LoRA layers (the base forward). Reload adds, replaces and removes adapters.
- fixed graph (``--compile``): every loaded adapter stays active in every forward and a
  request's selection is expressed by scales alone (0 for the others), so switching changes
  only float scales, which dynamo does not guard on (no recompilation; bench/bench_lora.py
  measures it). The adapters are loaded before the transformer is compiled, and the set is
  fixed from then on: adding or removing a PEFT layer changes the graph, and the compiled
  block is at dynamo's recompile limit after pre-warming (a new variant fails the forward
  under ``fullgraph=True``). Reload therefore reports changes as errors in this mode.

Not thread-safe: the engine thread calls ``activate`` and ``reload``; ``names`` and
``adapters`` read an immutable snapshot and may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pathlib
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError
from ..types import AdapterInfo, LoraRef, LoraReloadReport

if TYPE_CHECKING:
    from diffusers import ZImagePipeline

log = logging.getLogger(__name__)

# Request names are these characters (and a metrics label value: bounded by the files present).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SUFFIX = ".safetensors"
# "layers.3.attention.to_q" -> "attention.to_q": the module within its block.
_BLOCK_PREFIX = re.compile(r"^[A-Za-z_]+\.\d+\.")


class AdapterNotLoaded(LookupError):
    """An adapter named in a batch is not loaded (it was removed by a reload after validation)."""


class AdapterLoadError(ValueError):
    """A file could not be loaded as an adapter of this transformer; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Loaded:
    info: AdapterInfo
    peft_name: str  # PEFT's key for it: ModuleDict keys cannot hold the dots request names may
    path: pathlib.Path
    stamp: tuple[int, int]  # (mtime_ns, size): a changed file is reloaded


class LoraRegistry:
    """The adapters of one pipeline's transformer; see the module docstring."""

    def __init__(self, pipe: ZImagePipeline, directory: str | pathlib.Path, *, fixed_graph: bool = False):
        self._pipe = pipe
        self._transformer = pipe.transformer
        self.directory = pathlib.Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"--lora-dir {directory}: not a directory; create it or point the flag at one")
        self.fixed_graph = fixed_graph
        self._loaded: dict[str, _Loaded] = {}  # replaced, never mutated, so readers see a consistent snapshot
        self._failed: dict[str, tuple[tuple[int, int], str]] = {}  # name -> (stamp, error): not retried unchanged
        self._ids = itertools.count()
        self._active: tuple[LoraRef, ...] = ()
        self._enabled: bool | None = None  # whether the PEFT layers run; None: unknown, set it on the next apply
        self._layers: list[torch.nn.Module] | None = None  # PEFT's LoRA layers, listed again after each reload
        self._frozen = False
        self.switches = 0
        # Called on each change of the active set (the app passes a metrics counter's ``inc``).
        self.on_switch: Callable[[], None] | None = None

    # ------------------------------------------------------------------ queries
    def names(self) -> frozenset[str]:
        """Names of the loaded adapters."""
        return frozenset(self._loaded)

    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, sorted by name."""
        loaded = self._loaded
        return [loaded[name].info for name in sorted(loaded)]

    @property
    def active(self) -> tuple[LoraRef, ...]:
        return self._active

    # ------------------------------------------------------------------ switching
    def activate(self, loras: Sequence[LoraRef]) -> bool:
        """Make ``loras`` the adapter set of the next forwards; returns whether anything changed.

        Raises AdapterNotLoaded for a name that is not loaded (the active set is then unchanged).
        """
        key = tuple(loras)
        if key == self._active:
            return False
        self._apply(key, self._loaded)
        self._active = key
        self.switches += 1
        if self.on_switch is not None:
            self.on_switch()
        return True

    def _apply(self, key: tuple[LoraRef, ...], loaded: dict[str, _Loaded]) -> None:
        """Set PEFT's state for ``key``: what diffusers' ``set_adapters`` / ``disable_lora`` do, on the
        LoRA layers listed once per reload instead of a walk over every module of the transformer
        (3,791 modules at Z-Image-Turbo's depth: a third of a switch's cost, measured)."""
        missing = [ref.name for ref in key if ref.name not in loaded]
        if missing:
            raise AdapterNotLoaded(f"LoRA adapter(s) not loaded: {', '.join(missing)}")
        if not loaded:
            return  # no PEFT layers at all: the base forward
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self._transformer.modules() if isinstance(m, BaseTunerLayer)]
        scales = {loaded[ref.name].peft_name: ref.scale for ref in key}
        if self.fixed_graph:
            if self._enabled is not True:  # after a (re)load: every adapter active, once
                everyone = [entry.peft_name for entry in loaded.values()]
                for layer in self._layers:
                    layer.enable_adapters(True)
                    layer.set_adapter(everyone)
                self._enabled = True
            for layer in self._layers:  # then only scales change: floats dynamo does not guard on
                for entry in loaded.values():
                    layer.set_scale(entry.peft_name, scales.get(entry.peft_name, 0.0))
            return
        if not key:
            if self._enabled is not False:
                for layer in self._layers:
                    layer.enable_adapters(False)
                self._enabled = False
            return
        names = list(scales)
        for layer in self._layers:
            if self._enabled is not True:
                layer.enable_adapters(True)
            layer.set_adapter(names)
            for peft_name, scale in scales.items():
                layer.set_scale(peft_name, scale)
        self._enabled = True

    # ------------------------------------------------------------------ loading
    def reload(self) -> LoraReloadReport:
        """Scan the directory: load new and changed files, unload the adapters whose file is gone.

        Each file that fails (bad name, corrupt or foreign file) is logged and listed in the
        report's errors; the others are unaffected.
        """
        errors: list[str] = []
        found: dict[str, tuple[pathlib.Path, tuple[int, int]]] = {}
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
            found[name] = (path, (stat.st_mtime_ns, stat.st_size))

        current = self._loaded
        added = [n for n in found if n not in current]
        changed = [n for n in found if n in current and found[n][1] != current[n].stamp]
        removed = [n for n in current if n not in found]
        loaded = dict(current)
        failed = self._failed
        if self._frozen and (added or changed or removed):
            for name in added + changed:
                errors.append(f"{found[name][0].name}: not loaded: with --compile the adapter set is fixed at "
                              "start-up (a new PEFT layer would recompile the transformer); restart the server")
            for name in removed:
                errors.append(f"{current[name].path.name}: removed, but still loaded: with --compile the adapter "
                              "set is fixed at start-up; restart the server")
        else:
            for name in removed:
                self._discard(loaded.pop(name).peft_name)
                log.info("LoRA %s unloaded (file removed)", name)
            failed = {}
            for name in changed + added:
                path, stamp = found[name]
                if name in self._failed and self._failed[name][0] == stamp:
                    failed[name] = self._failed[name]  # the same file failed before: report it, don't retry
                    errors.append(failed[name][1])
                    continue
                try:
                    entry = self._load(name, path, stamp)
                except AdapterLoadError as exc:  # a bad file must never take the server down: report and skip it
                    error = f"{path.name}: {exc}"
                    if name in changed:
                        error += " (the previously loaded version stays)"
                    failed[name] = (stamp, error)
                    errors.append(error)
                    continue
                if name in loaded:
                    self._discard(loaded[name].peft_name)
                loaded[name] = entry
                log.info("LoRA %s loaded from %s (rank %d, %d bytes)", name, path, entry.info.rank, entry.info.size_bytes)
        # Loading makes the new adapter PEFT's active one and adds enabled layers: restore the active set
        # everywhere (it is dropped if it lost an adapter).
        active = self._active if all(r.name in loaded for r in self._active) else ()
        self._enabled = None
        self._layers = None
        self._apply(active, loaded)
        self._active = active
        self._loaded = loaded
        self._failed = failed
        for error in errors:
            log.error("LoRA %s", error)
        return LoraReloadReport(adapters=tuple(self.adapters()), errors=tuple(errors))

    def freeze(self) -> None:
        """Fix the adapter set from now on (fixed-graph mode, once the transformer is compiled)."""
        self._frozen = True

    def _load(self, name: str, path: pathlib.Path, stamp: tuple[int, int]) -> _Loaded:
        """Load one file; raises AdapterLoadError (whatever failed inside) with nothing left behind."""
        peft_name = f"zimage_lora_{next(self._ids)}"
        with warnings.catch_warnings():
            # Expected here: PEFT warns on every adapter after the first that the model already has a
            # peft_config, and when a failed adapter it had made active is deleted (reload re-applies the set).
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`")
            warnings.filterwarnings("ignore", message=".*was active which is now deleted")
            try:
                self._pipe.load_lora_weights(str(path), adapter_name=peft_name)
                info = self._describe(name, peft_name)
                if not info.target_modules:
                    raise ValueError("no layer of the transformer matched the adapter's keys")
            except Exception as exc:  # safetensors, diffusers' conversion and PEFT raise many kinds
                self._discard(peft_name)
                # Name the adapter as the user does, and keep the server's paths out of RPC replies.
                text = _short(str(exc).replace(peft_name, name).replace(str(path), path.name))
                raise AdapterLoadError(f"{type(exc).__name__}: {text}") from exc
        return _Loaded(info=info, peft_name=peft_name, path=path, stamp=stamp)

    def _discard(self, peft_name: str) -> None:
        if peft_name in getattr(self._transformer, "peft_config", {}):
            self._transformer.delete_adapters(peft_name)

    def _describe(self, name: str, peft_name: str) -> AdapterInfo:
        from peft.tuners.tuners_utils import BaseTunerLayer

        rank, size, targets = 0, 0, set()
        for module_name, module in self._transformer.named_modules():
            if not isinstance(module, BaseTunerLayer) or peft_name not in getattr(module, "r", {}):
                continue
            rank = max(rank, int(module.r[peft_name]))
            targets.add(_BLOCK_PREFIX.sub("", module_name))
            size += sum(_nbytes(p) for pname, p in module.named_parameters() if peft_name in pname.split("."))
        return AdapterInfo(name=name, rank=rank, target_modules=tuple(sorted(targets)), size_bytes=size)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
