"""Prompts in two tiers: every served prompt's precomputed form on the host (numpy, `engine.PromptStore`), and a
bounded device cache in front of it holding the hot ones (S-LoRA's and LoRAX's adapter paging, for prompts).

A request's prompt is put on the device when the request is admitted, before its prefill (`PromptStore.device`):
a hit reuses the cached arrays and marks them most recently used; a miss copies the host arrays to the device and
evicts least recently used prompts until the cache is within its limits (`--prompt-cache` prompts,
`--prompt-cache-mb` MiB; none: it holds every prompt). Adding or removing a prompt is O(1): the cache only drops
that prompt's entry.

Device layout: one small array set per cached prompt (the form its scheduler uses: a padded decode-slot row for
the continuous scheduler, the prompt's own prefix for the static batcher and echo scoring); a batch concatenates
its rows inside the jitted prefill (continuous) or in one concatenation per batch bucket and prompt shape (static),
so the number of compiled programs does not depend on the number of prompts or on the cache. An evicted prompt's
arrays live on while a batch that took them still runs (JAX frees them after it); the cache's own bytes never
exceed its limit. A request whose prompt was removed or replaced runs with the prompt it asked for: its host arrays
are copied for it and not cached.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class CacheLimits:
  """The device cache's size: at most `prompts` prompts and `bytes` bytes (None: no limit)."""

  prompts: int | None = None
  bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class CacheStats:
  """Counters since start (hits, misses, evictions) and what the device cache holds now."""

  hits: int
  misses: int
  evictions: int
  device_prompts: int
  device_bytes: int
  peak_bytes: int  # the most the cache held at once
  limit_prompts: int | None
  limit_bytes: int | None


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays in a pytree (host or device)."""
  return sum(int(a.nbytes) for a in jax.tree.leaves(tree))


@dataclasses.dataclass(eq=False)
class _Entry:
  owner: object  # the prompt (kept so its id is not reused while the entry lives)
  forms: dict[str, Any]  # variant -> device pytree
  bytes: int = 0


class DeviceCache:
  """An LRU of prompts' device arrays, keyed by the prompt object (thread-safe; every operation O(1) but
  evictions, each O(1))."""

  def __init__(self, limits: CacheLimits = CacheLimits()):
    self.limits = limits
    self._lock = threading.Lock()
    self._entries: OrderedDict[int, _Entry] = OrderedDict()
    self._bytes = self._peak = 0
    self.hits = self.misses = self.evictions = 0

  def get(self, owner: object, variant: str, make: Callable[[], Any], alive: Callable[[], bool]) -> Any:
    """`owner`'s `variant` on the device: cached, or `make()` (put on the device) and cached when `alive()` (checked
    under the lock, so a prompt removed meanwhile is never cached again)."""
    key = id(owner)
    with self._lock:
      entry = self._entries.get(key)
      if entry is not None and entry.owner is owner and variant in entry.forms:
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.forms[variant]
      self.misses += 1
    value = make()
    size = tree_bytes(value)
    with self._lock:
      if not alive() or (self.limits.bytes is not None and size > self.limits.bytes):
        return value  # served uncached: removed meanwhile, or larger than the whole cache
      entry = self._entries.get(key)
      if entry is None or entry.owner is not owner:
        entry = self._entries[key] = _Entry(owner, {})
      self._bytes += size - tree_bytes(entry.forms.get(variant, ()))
      entry.forms[variant] = value
      entry.bytes = tree_bytes(entry.forms)
      self._entries.move_to_end(key)
      self._evict(keep=key)
      self._peak = max(self._peak, self._bytes)
    return value

  def _evict(self, keep: int) -> None:
    """Drop least recently used prompts (never `keep`) until within the limits (lock held)."""
    lim = self.limits
    while len(self._entries) > 1 and (
      (lim.prompts is not None and len(self._entries) > lim.prompts)
      or (lim.bytes is not None and self._bytes > lim.bytes)
    ):
      key, entry = next(iter(self._entries.items()))
      if key == keep:
        break
      del self._entries[key]
      self._bytes -= entry.bytes
      self.evictions += 1

  def drop(self, owner: object) -> None:
    """Forget `owner`'s arrays (a removed or replaced prompt): O(1)."""
    with self._lock:
      entry = self._entries.get(id(owner))
      if entry is not None and entry.owner is owner:
        del self._entries[id(owner)]
        self._bytes -= entry.bytes

  def __contains__(self, owner: object) -> bool:
    entry = self._entries.get(id(owner))
    return entry is not None and entry.owner is owner

  def order(self) -> list[object]:
    """The cached prompts, least recently used first."""
    with self._lock:
      return [e.owner for e in self._entries.values()]

  def stats(self) -> CacheStats:
    with self._lock:
      return CacheStats(
        hits=self.hits,
        misses=self.misses,
        evictions=self.evictions,
        device_prompts=len(self._entries),
        device_bytes=self._bytes,
        peak_bytes=self._peak,
        limit_prompts=self.limits.prompts,
        limit_bytes=self.limits.bytes,
      )
