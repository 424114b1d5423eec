"""The one self-attention path of every model: where a layer's keys and values come from, and the block itself.

Notation: Y layers, B batch, L new tokens (queries), P prefix slots, S cache slots, N query heads, K key/value heads,
D head dim, H hidden.

A self-attention layer attends over its own new keys/values plus, at most, one other source (`KVSource`):
  `Fresh`    nothing else (a full forward pass);
  `Prefixed` P slots in front of its own (a key/value prefix: prefix tuning, deep prompts, a shared prompt's keys
             and values) — used as given, no rotary embedding applied to them, as PEFT stores them;
  `Cached`   a cache of S slots [Y, B, S, K, D]: each layer writes its new keys/values at `index` (one slot for
             every row, or each row's own slot [B] — a server's decode slots) and attends over all S, the mask in
             the bias deciding which slots are real. A cached step's layers run in `scan_in_place`, which carries
             the whole stack and hands each layer an `InPlace` (the stack and its layer index) to write into, so a
             step writes one slot per row instead of copying the cache.
Prefixes hold every layer's arrays stacked [Y, ...] too; the layer scan hands each layer its own slice. T5's
decoder self-attention and the decoder-only models go through `self_attention`; `fill_prefix` writes a prefix into
the front of a fresh cache for both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxprompt.models import layers as L


def write_layer_rows(cache: jax.Array, new: jax.Array, layer, index) -> jax.Array:
  """cache [Y, B, S, K, D] with new [B, l, K, D] written into layer `layer` at slot `index` (a scalar: every row;
  [B]: row b at index[b])."""
  new = new.astype(cache.dtype)
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, index, 0, 0))
  b, n = new.shape[:2]
  slots = jnp.asarray(index, jnp.int32)[:, None] + jnp.arange(n)  # [B, l]
  return cache.at[layer, jnp.arange(b)[:, None], slots].set(new, mode="clip")


def scan_in_place(layer_fn, x: jax.Array, stacked: dict, rng: jax.Array | None, per_layer: dict):
  """`layers.scan_layers` for a cached step: `per_layer["kv"]` (a `Cached` stack [Y, B, S, K, D]) rides in the
  scan's carry as `InPlace` and each layer writes its new keys/values into it (a scan over the cache as a per-layer
  input, what this replaced, sliced every layer's cache out and stacked the written ones into a new cache: three
  copies of the whole cache per token). `layer_fn(p, x, rng, xs) -> (x, InPlace)`; the other `per_layer` entries
  are stacked on axis 0 (None: nothing). -> (x, the updated `Cached`)."""
  kv, rest = per_layer["kv"], {k: a for k, a in per_layer.items() if k != "kv"}
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  rngs = None if rng is None else L.split_keys(rng, num_layers)

  def body(carry, xs):
    x, keys, values = carry
    p, r, y, extra = xs
    x, written = layer_fn(p, x, r, dict(extra, kv=InPlace(keys, values, y)))
    return (x, written.keys, written.values), None

  (x, keys, values), _ = jax.lax.scan(body, (x, kv.keys, kv.values), (stacked, rngs, jnp.arange(num_layers), rest))
  return x, Cached(keys, values)


def insert_rows(slots, rows, ids: jax.Array):
  """A decode-slot cache (a model's cache pytree, N rows) with `rows` (the same layout, b rows) written at slots
  ids [b]; an id out of range (N) drops its row (a padding row). Arrays [Y, B, S, K, D] (keys/values, layers first)
  take rows along axis 1, the others along axis 0."""

  def put(s: jax.Array, r: jax.Array) -> jax.Array:
    at = (slice(None),) * (1 if s.ndim == 5 else 0) + (ids,)
    return s.at[at].set(r.astype(s.dtype), mode="drop")

  return jax.tree.map(put, slots, rows)


@struct.dataclass
class Fresh:
  """No keys/values besides the layer's own."""

  def attach(self, k: jax.Array, v: jax.Array, index) -> tuple[jax.Array, jax.Array, None]:
    return k, v, None


@struct.dataclass
class Prefixed:
  """keys/values [(Y,) B, P, K, D] in front of the layer's own (read only)."""

  keys: jax.Array
  values: jax.Array

  def attach(self, k: jax.Array, v: jax.Array, index) -> tuple[jax.Array, jax.Array, None]:
    return (
      jnp.concatenate([self.keys.astype(k.dtype), k], axis=1),
      jnp.concatenate([self.values.astype(v.dtype), v], axis=1),
      None,
    )


@struct.dataclass
class Cached:
  """A cache [Y, B, S, K, D] (see the module docstring): a stack's layers run over it in `scan_in_place`, each
  layer getting an `InPlace`."""

  keys: jax.Array
  values: jax.Array


@struct.dataclass
class InPlace:
  """Every layer's cache [Y, B, S, K, D] and the layer `y` that attends now: its new keys/values are written
  straight into the stacked arrays (in place under XLA: no per-step copy of the cache) and it attends over its own
  S slots. `scan_in_place` hands it from layer to layer in its carry; `attach` returns the updated stack."""

  keys: jax.Array
  values: jax.Array
  layer: jax.Array | int

  def attach(self, k: jax.Array, v: jax.Array, index) -> tuple[jax.Array, jax.Array, "InPlace"]:
    keys = write_layer_rows(self.keys, k, self.layer, index)
    values = write_layer_rows(self.values, v, self.layer, index)
    y = self.layer
    return (
      jax.lax.dynamic_index_in_dim(keys, y, keepdims=False),
      jax.lax.dynamic_index_in_dim(values, y, keepdims=False),
      InPlace(keys, values, y),
    )


KVSource = Fresh | Prefixed | Cached | InPlace


def source(prefix_kv=None, cache=None) -> KVSource:
  """The source of a stack's self-attention: a cache (k, v) [Y, B, S, K, D], else a prefix (k, v) [Y, B, P, K, D],
  else none."""
  if cache is not None:
    return Cached(*cache)
  if prefix_kv is not None:
    return Prefixed(*prefix_kv)
  return Fresh()


def fill_prefix(keys: jax.Array, values: jax.Array, prefix, batch_size: int, repeat: int = 1):
  """A fresh cache's k/v [Y, B * repeat, S, K, D] with a `models.interface.Prefix`'s key/value slots written into
  its first P slots (each row repeated `repeat` times: beams); unchanged without a key/value prefix."""
  if prefix is None or prefix.kv_length == 0:
    return keys, values
  pk, pv = prefix.kv(batch_size, repeat=repeat)
  put = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0,) * cache.ndim)  # noqa: E731
  return put(keys, pk), put(values, pv)


def adaption_keys_values(p: dict, prompt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Adaption prompts' keys/values (PEFT's AdaptedAttention): the layers' own k/v projections `p` (k/v [Y, H, K, D],
  optional k_bias / v_bias [Y, K, D]: every layer's, stacked) of the raw prompts [B, Y, A, H] — not normed, no rotary
  embedding — in the prompts' dtype -> (keys, values) [Y, B, A, K, D]. A prompt's keys/values depend on nothing
  else: a model computes them once per call (`FrozenLM.adaption_kv`), a server once per prompt."""

  def one(w, bias, x):  # one layer: x [B, A, H]
    return L.project_qkv(x, w, bias)

  per_layer = jnp.moveaxis(prompt, 1, 0)  # [Y, B, A, H]
  k = jax.vmap(one)(p["k"], p.get("k_bias"), per_layer)
  v = jax.vmap(one)(p["v"], p.get("v_bias"), per_layer)
  return k, v


def adaption_attention(p: dict, q: jax.Array, adaption: tuple, *, project_out: bool) -> jax.Array:
  """An adaption prompt's attention (PEFT's AdaptedAttention, LLaMA-Adapter): queries q [B, L, N, D] (rotary
  embedding applied) over the prompt's keys/values [B, A, K, D] (`adaption_keys_values`: no rotary embedding) — no
  mask, a softmax of its own in float32 with scores / sqrt(D) — times the gate [B]; query head n reads key/value
  head n // (N / K). -> [B, L, H]: o-projected (bias included) where PEFT does (`project_out`; GPT-2: not), times
  `on` [B] (0: a layer without an adaption prompt). `adaption` is this layer's (keys, values, gate, on, mask); mask
  [B, A] (1 = real): rows whose prompts were padded to one A (a server's decode slots) leave their padding out of
  the softmax."""
  k, v, gate, on, mask = adaption
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  b, n_len, n, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, n_len, kh, n // kh, d)
  scores = jnp.einsum("BLKGD,BAKD->BKGLA", qg, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
  scores = jnp.where(mask[:, None, None, None, :] > 0, scores.astype(jnp.float32), L.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1) * gate.astype(jnp.float32)[:, None, None, None, None]
  o = jnp.einsum("BKGLA,BAKD->BLKGD", probs.astype(q.dtype), v).reshape(b, n_len, n * d)
  out = L.project_out(o.reshape(b, n_len, n, d), p["o"], p.get("o_bias")) if project_out else o
  return out * on.astype(out.dtype)[:, None, None]


def self_attention(
  p: dict,
  h: jax.Array,
  kv: KVSource,
  *,
  bias: jax.Array | None,
  scale: float,
  index=0,
  rope: tuple[jax.Array, jax.Array] | None = None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
  implementation: str = "auto",
  adaption: tuple | None = None,
  adaption_projects_out: bool = True,
) -> tuple[jax.Array, Cached | None]:
  """One layer's self-attention over normed inputs h [B, L, H]: q/k/v projections `p` (q [H, N, D], k/v [H, K, D],
  o [N, D, H], optional q_bias / k_bias / v_bias / o_bias), rotary embedding (cos, sin) on queries and new keys,
  keys/values from `kv` (see the module docstring), scores + `bias` (broadcastable to [B, N, L, S]), plus an
  adaption prompt's output (`adaption_attention`: this layer's (keys, values [B, A, K, D], gate [B], on [B], mask
  [B, A]))
  ->
  (output [B, L, H] before dropout, the updated cache or None)."""
  q = L.project_qkv(h, p["q"], p.get("q_bias"))
  k = L.project_qkv(h, p["k"], p.get("k_bias"))
  v = L.project_qkv(h, p["v"], p.get("v_bias"))
  if rope is not None:
    q, k = L.apply_rope(q, *rope), L.apply_rope(k, *rope)
  k, v, written = kv.attach(k, v, index)
  o = L.dot_product_attention(
    q, k, v, bias, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng, implementation=implementation
  )
  out = L.project_out(o, p["o"], p.get("o_bias"))
  if adaption is not None:
    out = out + adaption_attention(p, q, adaption, project_out=adaption_projects_out).astype(out.dtype)
  return out, written
