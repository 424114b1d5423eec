"""The serving device cache of prompts (`serve.cache.DeviceCache`): least recently used evicted within a count and a
byte limit, an evicted prompt copied in again, adding / removing one prompt touching no other, a prompt removed
while a request holds it served but never cached again. No model: prompts are small arrays."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.serve.cache import CacheLimits, DeviceCache, tree_bytes


@dataclasses.dataclass(eq=False)
class _Prompt:
  name: str
  value: np.ndarray


def _prompts(n: int, size: int = 8) -> list[_Prompt]:
  return [_Prompt(f"p{i}", np.full((1, size), i, np.float32)) for i in range(n)]


def _get(cache: DeviceCache, p: _Prompt, served=None, variant: str = "row"):
  made = []

  def make():
    made.append(p.name)
    return {"x": jnp.asarray(p.value)}

  alive = (lambda: True) if served is None else (lambda: served.get(p.name) is p)
  return cache.get(p, variant, make, alive), bool(made)


def test_least_recently_used_is_evicted_and_comes_back_when_asked_again():
  cache = DeviceCache(CacheLimits(prompts=3))
  ps = _prompts(5)
  for p in ps[:3]:
    assert _get(cache, p)[1]  # misses: copied in
  assert _get(cache, ps[0])[1] is False  # a hit: p0 is now the most recently used
  assert [p.name for p in cache.order()] == ["p1", "p2", "p0"]
  _get(cache, ps[3])  # evicts p1, the least recently used
  assert [p.name for p in cache.order()] == ["p2", "p0", "p3"]
  value, made = _get(cache, ps[1])  # the evicted one is copied in again, p2 goes
  assert made and np.array_equal(np.asarray(value["x"]), ps[1].value)
  assert [p.name for p in cache.order()] == ["p0", "p3", "p1"]
  s = cache.stats()
  assert (s.hits, s.misses, s.evictions, s.device_prompts) == (1, 5, 2, 3)
  assert s.device_bytes == 3 * ps[0].value.nbytes


def test_a_byte_limit_holds_and_a_prompt_larger_than_the_cache_is_served_uncached():
  row = _prompts(1)[0].value.nbytes
  cache = DeviceCache(CacheLimits(bytes=2 * row + row // 2))  # room for two
  for p in _prompts(6):
    _get(cache, p)
    assert cache.stats().device_bytes <= cache.limits.bytes
  assert cache.stats().device_prompts == 2 and cache.stats().peak_bytes == 2 * row
  big = _Prompt("big", np.zeros((1, 64), np.float32))
  value, made = _get(cache, big)
  assert made and value["x"].shape == (1, 64) and big not in cache
  assert cache.stats().device_prompts == 2  # nothing evicted for it


def test_dropping_one_prompt_touches_no_other_and_a_removed_prompt_in_flight_is_served_not_cached():
  cache = DeviceCache()
  ps = _prompts(4)
  served = {p.name: p for p in ps}
  held = {p.name: _get(cache, p, served)[0] for p in ps}
  del served["p1"]
  cache.drop(ps[1])  # what PromptStore.remove does: O(1), the others' arrays stay as they are
  assert ps[1] not in cache and all(_get(cache, p, served)[0] is held[p.name] for p in ps if p.name != "p1")
  # a request still holding p1 (queued before the removal) gets p1's arrays, which are not cached again
  value, made = _get(cache, ps[1], served)
  assert made and np.array_equal(np.asarray(value["x"]), ps[1].value) and ps[1] not in cache
  # replaced under the same name: the old object is a different key; its in-flight arrays stay valid
  new = _Prompt("p2", np.full((1, 8), 9, np.float32))
  old_arrays = held["p2"]
  served["p2"] = new
  cache.drop(ps[2])
  assert np.asarray(_get(cache, new, served)[0]["x"])[0, 0] == 9
  assert np.asarray(old_arrays["x"])[0, 0] == 2  # an admitted batch's rows are unaffected
  assert cache.stats().device_bytes == tree_bytes([held["p0"], held["p3"], {"x": new.value}])


def test_variants_of_one_prompt_share_its_entry():
  cache = DeviceCache(CacheLimits(prompts=1))
  p, q = _prompts(2)
  _get(cache, p, variant="row")
  _get(cache, p, variant="prefix")
  assert cache.stats().device_prompts == 1 and cache.stats().evictions == 0
  assert cache.stats().device_bytes == 2 * p.value.nbytes
  _get(cache, q)
  assert cache.order() == [q] and cache.stats().device_bytes == q.value.nbytes
  assert isinstance(jax.tree.leaves(_get(cache, q)[0])[0], jax.Array)


def test_the_serve_flags_set_the_limits_and_a_bad_one_is_named():
  import pytest

  from jaxprompt.errors import UsageError
  from jaxprompt.serve.server import cache_limits

  assert cache_limits(None, None) == CacheLimits()
  assert cache_limits(4, 1.5) == CacheLimits(prompts=4, bytes=3 * 2**19)
  with pytest.raises(UsageError, match="--prompt-cache 0"):
    cache_limits(0, None)
  with pytest.raises(UsageError, match="--prompt-cache-mb -1"):
    cache_limits(None, -1.0)
