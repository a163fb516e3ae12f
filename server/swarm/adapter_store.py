"""The unmerged adapters a block server offers, kept current while it serves.

Each ``--adapter NAME=DIR`` is watched: when ``DIR``'s files change (a federated round wrote a
new ``adapter/``), the new version is loaded beside the old and becomes the one new requests
get; sessions already open keep the version they started with (they hold it), and the server
re-announces the new digest so clients route new generations to servers that agree on it.
A folder that is missing or half-written is retried at the next check, the old version kept.
Each ``--adapter-dir ROOT`` adds adapters while serving: every subfolder of ROOT that is an
adapter folder (or holds one in ``adapter/``, as a federated run does) is served under its name.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.adapter_digest import ADAPTER_FILES
from fedswarm.server.swarm.options import ADAPTER_NAME, AdapterSource

if TYPE_CHECKING:
    from fedswarm.protos import swarm_pb2
    from fedswarm.server.swarm.blocks import SpanModel
    from fedswarm.server.swarm.unmerged_lora import SpanAdapter

log = logging.getLogger("fedswarm.swarm.adapters")

Fingerprint = tuple[tuple[int, int, int], ...]
MAX_DISCOVERED = 1000  # adapters taken from --adapter-dir folders (the registry's per-server limit)


class AdapterStore:
    """The current version of each named adapter; thread-safe."""

    def __init__(self, span: SpanModel, sources: Sequence[AdapterSource] = (), roots: Sequence[Path] = ()) -> None:
        self.span = span
        self.sources = list(sources)
        self.roots = list(roots)  # folders whose adapter subfolders are served under their names
        self._lock = threading.Lock()
        self._current: dict[str, SpanAdapter] = {}
        self._seen: dict[str, Fingerprint | None] = {}  # the files each name was last loaded (or refused) from

    def get(self, name: str) -> SpanAdapter | None:
        with self._lock:
            return self._current.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._current)

    def announced(self) -> list[swarm_pb2.AdapterInfo]:
        from fedswarm.protos import swarm_pb2

        with self._lock:
            return [swarm_pb2.AdapterInfo(name=n, digest=a.digest) for n, a in sorted(self._current.items())]

    def poll(self, strict: bool = False) -> bool:
        """Load every source whose files changed; returns whether any adapter's version changed.

        ``strict`` (at start-up) raises on an adapter folder that exists but cannot be used, so
        a wrong flag fails at once; later a bad version is logged and the old one kept.
        """
        from fedswarm.common.errors import FedswarmError
        from fedswarm.server.swarm.unmerged_lora import load_unmerged

        changed = False
        named = {source.name for source in self.sources}
        for source in [*self.sources, *self._discovered(named)]:
            strict_here = strict and source.name in named
            fingerprint = _fingerprint(source.folder)
            if fingerprint is None:
                if strict_here or self._seen.get(source.name, ()) is not None:
                    log.warning("adapter %s: no adapter in %s yet; watching it", source.name, source.folder)
                self._seen[source.name] = None
                continue
            if fingerprint == self._seen.get(source.name):
                continue
            try:
                adapter = load_unmerged(self.span, source.name, source.folder)
            except (OSError, ValueError, FedswarmError) as exc:  # safetensors raises its own error types too
                if strict_here and isinstance(exc, FedswarmError):
                    raise
                log.warning("adapter %s: cannot load %s (%s); keeping the current one", source.name, source.folder, exc)
                self._seen[source.name] = fingerprint
                continue
            except Exception as exc:  # noqa: BLE001 (a half-written safetensors file)
                log.warning("adapter %s: cannot load %s (%s); retrying", source.name, source.folder, exc)
                continue
            self._seen[source.name] = fingerprint
            with self._lock:
                old = self._current.get(source.name)
                if old is not None and old.digest == adapter.digest:
                    continue
                self._current[source.name] = adapter
            log.info(
                "adapter %s: serving version %s from %s%s",
                source.name, adapter.digest, source.folder, f" (was {old.digest})" if old else "",
            )  # fmt: skip
            changed = True
        return changed

    def _discovered(self, named: set[str]) -> list[AdapterSource]:
        """Adapter subfolders of the roots, by name (names given with --adapter NAME=DIR win)."""
        found: dict[str, AdapterSource] = {}
        for root in self.roots:
            try:
                subfolders = sorted(p for p in root.iterdir() if p.is_dir())
            except OSError:
                continue
            for sub in subfolders:
                if sub.name in named or sub.name in found or not ADAPTER_NAME.match(sub.name):
                    continue
                folder = sub if (sub / ADAPTER_FILES[0]).is_file() else sub / "adapter"
                if _fingerprint(folder) is not None:
                    found[sub.name] = AdapterSource(sub.name, folder)
        if len(found) > MAX_DISCOVERED:
            log.warning("%d adapters under --adapter-dir; serving the first %d", len(found), MAX_DISCOVERED)
        return list(found.values())[:MAX_DISCOVERED]

    def start_watcher(
        self, stop: threading.Event, on_change: Callable[[], None], period_s: float = 2.0
    ) -> threading.Thread:
        """Poll every ``period_s`` seconds; call ``on_change`` (re-announce) when a version changed."""

        def loop() -> None:
            while not stop.wait(period_s):
                try:
                    if self.poll():
                        on_change()
                except Exception:  # noqa: BLE001 (the watcher must outlive one bad poll)
                    log.exception("adapter watcher: poll failed")

        thread = threading.Thread(target=loop, name="adapter-watcher", daemon=True)
        thread.start()
        return thread


def _fingerprint(folder: Path) -> Fingerprint | None:
    """Inode, size and mtime of the adapter's files: a new folder renamed into place changes it too."""
    try:
        stats = [(folder / name).stat() for name in ADAPTER_FILES]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)
