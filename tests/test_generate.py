"""KV-cache generation: cached == uncached, greedy == transformers' generate, beam == brute force, sampling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxprompt
from jaxprompt import sharding as shd
from jaxprompt.inference import decoding as gen
from jaxprompt.inference import generate
from tests.helpers_hf import load_decoder, load_t5, write_decoder, write_t5

T_NEW = 8


@pytest.fixture(scope="session")
def gen_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  return dict(
    llama=write_decoder(root / "llama", "llama3-gqa-untied", seed=0),
    t5=write_t5(root / "t5", "t5v11-gated-untied", seed=0),
    # tiny vocabularies for brute-force enumeration of every sequence
    llama6=write_decoder(
      root / "llama6",
      "llama3-gqa-untied",
      seed=1,
      vocab_size=6,
      pad_token_id=0,
      bos_token_id=1,
      eos_token_id=2,
      initializer_range=0.5,
    ),
    t5_6=write_t5(root / "t5_6", "t5v11-gated-untied", seed=1, vocab_size=6),
  )


@pytest.fixture(scope="session")
def models(gen_dirs):
  return {k: jaxprompt.load_model(v) for k, v in gen_dirs.items()}


def _prefix(kind, b=3, length=7, vocab=96, seed=0):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, vocab, (b, length), generator=g)
  mask = torch.ones(b, length, dtype=torch.long)
  mask[1, :2] = 0  # left padding (decoders need it; T5 takes any)
  mask[2, :4] = 0
  if kind == "t5":
    mask[1] = torch.tensor([1] * 5 + [0] * 2)  # and right padding for T5
  return ids, mask


def j(t):
  return jnp.asarray(t.numpy())


def _uncached_greedy(model, ids, mask, steps):
  """Recompute the whole sequence every step, no cache: the reference for cached decoding. The sequence
  lives in a fixed-size buffer (later slots are causally invisible), so one compiled forward serves all steps."""
  ids, mask = np.asarray(ids), np.asarray(mask)
  b, length = ids.shape
  if model.kind == "seq2seq":
    fwd = jax.jit(lambda dec: model(jnp.asarray(ids), jnp.asarray(mask), decoder_input_ids=dec))
    dec = np.zeros((b, steps), np.int32)  # decoder_start_token_id, then the generated tokens
    for t in range(steps):
      nxt = np.asarray(fwd(jnp.asarray(dec)))[:, t].argmax(-1)
      if t + 1 < steps:
        dec[:, t + 1] = nxt
    return np.concatenate([dec[:, 1:], nxt[:, None]], axis=1)
  m = np.concatenate([mask, np.ones((b, steps), mask.dtype)], axis=1)
  pos = np.maximum(np.cumsum(m, axis=1) - 1, 0)
  fwd = jax.jit(lambda seq: model(seq, jnp.asarray(m), positions=jnp.asarray(pos)))
  seq = np.concatenate([ids, np.zeros((b, steps), ids.dtype)], axis=1)
  for t in range(steps):
    seq[:, length + t] = np.asarray(fwd(jnp.asarray(seq)))[:, length + t - 1].argmax(-1)
  return seq[:, length:]


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_cached_greedy_equals_uncached(models, name):
  m = models[name]
  ids, mask = _prefix(name)
  out = generate(m, input_ids=j(ids), attention_mask=j(mask), max_new_tokens=T_NEW, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), _uncached_greedy(m, ids, mask, T_NEW))
  assert out["tokens"].shape == (3, T_NEW) and (np.asarray(out["lengths"]) == T_NEW).all()


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_greedy_equals_transformers_generate(gen_dirs, models, name):
  ref = load_t5(gen_dirs[name]) if name == "t5" else load_decoder(gen_dirs[name])
  ids, mask = _prefix(name)
  with torch.no_grad():
    r = ref.generate(ids, attention_mask=mask, max_new_tokens=T_NEW, do_sample=False).numpy()
  r = r[:, 1:] if name == "t5" else r[:, ids.shape[1] :]  # drop the decoder start / the prompt
  out = generate(models[name], input_ids=j(ids), attention_mask=j(mask), max_new_tokens=T_NEW)  # config EOS
  got = np.asarray(out["tokens"])
  pad = ref.config.pad_token_id
  # transformers stops once every row finished; it pads finished rows with pad_token_id, as we do
  np.testing.assert_array_equal(got[:, : r.shape[1]], r)
  assert (got[:, r.shape[1] :] == pad).all()


def test_eos_finishes_rows_and_pads(models):
  m = models["llama"]
  ids, mask = _prefix("llama")
  free = np.asarray(generate(m, input_ids=j(ids), attention_mask=j(mask), max_new_tokens=T_NEW, eos_id=-1)["tokens"])
  eos = int(free[0, 3])  # make a token row 0 emits at step 3 the EOS
  out = generate(m, input_ids=j(ids), attention_mask=j(mask), max_new_tokens=T_NEW, eos_id=eos, pad_id=0)
  got, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  for row, toks in enumerate(free):
    hits = np.flatnonzero(toks == eos)
    n = hits[0] + 1 if len(hits) else T_NEW
    assert lengths[row] == n
    np.testing.assert_array_equal(got[row, :n], toks[:n])
    assert (got[row, n:] == 0).all()
  assert lengths[0] == 4
  # scores are the summed log-probabilities of the emitted tokens, up to and including EOS
  logits = np.asarray(
    m(
      jnp.concatenate([j(ids[:1]), jnp.asarray(got[:1, :4])], 1),
      jnp.concatenate([j(mask[:1]), jnp.ones((1, 4), jnp.int32)], 1),
      positions=jnp.arange(11)[None],
    )
  )[0, 6:10]
  logp = jax.nn.log_softmax(logits, -1)[np.arange(4), got[0, :4]]
  np.testing.assert_allclose(float(out["scores"][0]), float(logp.sum()), rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_inputs_embeds_equal_input_ids(models, name):
  m = models[name]
  ids, mask = _prefix(name)
  for method in ("greedy", "beam"):
    a = generate(m, input_ids=j(ids), attention_mask=j(mask), max_new_tokens=5, method=method)
    b = generate(m, inputs_embeds=m.embed(j(ids)), attention_mask=j(mask), max_new_tokens=5, method=method)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    np.testing.assert_allclose(np.asarray(a["scores"]), np.asarray(b["scores"]), rtol=1e-5)


def test_soft_prompt_prefix_equals_uncached(models):
  """A [P, H] prompt prepended to the embeddings (mask extended with ones), as the prompt layer does."""
  m = models["llama"]
  ids, mask = _prefix("llama")
  prompt = 0.2 * jax.random.normal(jax.random.key(0), (4, 32))
  x = jnp.concatenate([jnp.broadcast_to(prompt, (3, 4, 32)), m.embed(j(ids))], axis=1)
  mk = jnp.concatenate([jnp.ones((3, 4), jnp.int32), j(mask)], axis=1)
  got = np.asarray(generate(m, inputs_embeds=x, attention_mask=mk, max_new_tokens=4, eos_id=-1)["tokens"])
  # uncached: the embeddings in a fixed buffer (later slots causally invisible), positions from the mask
  n = x.shape[1]
  mk = jnp.concatenate([mk, jnp.ones((3, 4), jnp.int32)], axis=1)
  pos = jnp.maximum(jnp.cumsum(mk, 1) - 1, 0)
  fwd = jax.jit(lambda x: m(inputs_embeds=x, attention_mask=mk, positions=pos))
  x = jnp.concatenate([x, jnp.zeros((3, 4, 32))], axis=1)
  for t in range(4):
    np.testing.assert_array_equal(got[:, t], np.asarray(fwd(x)[:, n + t - 1].argmax(-1)))
    x = x.at[:, n + t].set(m.embed(jnp.asarray(got[:, t])))


def _prefix_logps(model, ids, mask, seqs):
  """Teacher-forced log p of every prefix of each continuation: seqs [C, n] -> cumulative [C, n] (uncached)."""
  c, n = seqs.shape
  if model.kind == "seq2seq":
    dec = np.concatenate([np.zeros((c, 1), np.int32), seqs[:, :-1]], axis=1)
    logits = model(jnp.repeat(ids, c, 0), jnp.repeat(mask, c, 0), decoder_input_ids=jnp.asarray(dec))
  else:
    full = jnp.concatenate([jnp.repeat(ids, c, 0), jnp.asarray(seqs)], axis=1)
    mk = jnp.concatenate([jnp.repeat(mask, c, 0), jnp.ones((c, n), jnp.int32)], axis=1)
    pos = jnp.maximum(jnp.cumsum(mk, 1) - 1, 0)
    logits = model(full, mk, positions=pos)[:, ids.shape[1] - 1 : -1]
  logp = jax.nn.log_softmax(logits, -1)
  return np.cumsum(np.asarray(jnp.take_along_axis(logp, jnp.asarray(seqs)[..., None], -1)[..., 0]), axis=1)


@pytest.mark.parametrize("name", ["llama6", "t5_6"])
def test_beam_search_finds_the_best_sequence_by_enumeration(models, name):
  m, v, steps, eos, alpha = models[name], 6, 3, (2 if name == "llama6" else 1), 0.6
  ids = jnp.array([[3, 4, 5, 3]])
  mask = jnp.array([[0, 1, 1, 1]]) if name == "llama6" else jnp.array([[1, 1, 1, 0]])
  # every complete sequence (EOS-terminated with no earlier EOS, or length-capped), scored by enumeration:
  # one teacher-forced pass over all v**steps sequences gives the log-probability of every prefix
  full = np.array(list(itertools.product(range(v), repeat=steps)), np.int32)
  cum = _prefix_logps(m, ids, mask, full)
  table = {}
  for seq, c in zip(full.tolist(), cum, strict=True):
    for n in range(1, steps + 1):
      if eos not in seq[: n - 1] and (n == steps or seq[n - 1] == eos):
        table[tuple(seq[:n])] = c[n - 1] / ((5 + n) / 6) ** alpha
  best_seq = max(table, key=table.get)
  # 36 = 6**2 beams keep every live prefix: the search is exhaustive, so it must find the optimum
  out = generate(
    m,
    input_ids=ids,
    attention_mask=mask,
    max_new_tokens=steps,
    method="beam",
    num_beams=36,
    alpha=alpha,
    eos_id=eos,
    pad_id=0,
  )
  want = list(best_seq) + [0] * (steps - len(best_seq))
  assert np.asarray(out["tokens"])[0].tolist() == want
  assert int(out["lengths"][0]) == len(best_seq)
  np.testing.assert_allclose(float(out["scores"][0]), table[best_seq], rtol=1e-5)
  # returned beams are sorted and scored as enumeration scores them
  beam_scores = np.asarray(out["beam_scores"])[0]
  assert (np.diff(beam_scores) <= 0).all()
  for seq, score in zip(np.asarray(out["beams"])[0], beam_scores, strict=True):
    n = next((i + 1 for i, t in enumerate(seq) if t == eos), steps)
    np.testing.assert_allclose(score, table[tuple(seq[:n].tolist())], rtol=1e-5)
  # a narrow beam (the default 4) returns a real sequence with its true score
  narrow = generate(m, input_ids=ids, attention_mask=mask, max_new_tokens=steps, method="beam", eos_id=eos, pad_id=0)
  seq = np.asarray(narrow["tokens"])[0]
  n = int(narrow["lengths"][0])
  np.testing.assert_allclose(float(narrow["scores"][0]), table[tuple(seq[:n].tolist())], rtol=1e-5)
  assert float(narrow["scores"][0]) <= table[best_seq] + 1e-6


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_top_k_1_sampling_equals_greedy(models, name):
  m = models[name]
  ids, mask = _prefix(name)
  greedy = generate(m, input_ids=j(ids), attention_mask=j(mask), max_new_tokens=T_NEW)
  for kw in (dict(top_k=1, temperature=0.7), dict(top_p=1e-6)):
    s = generate(
      m, input_ids=j(ids), attention_mask=j(mask), max_new_tokens=T_NEW, method="sample", rng=jax.random.key(3), **kw
    )
    np.testing.assert_array_equal(np.asarray(s["tokens"]), np.asarray(greedy["tokens"]))


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))

  def draw(**kw):
    return np.asarray(gen._filter_and_sample(logits, 1.0, rng=jax.random.key(0), **kw))

  assert set(draw(top_k=2, top_p=1.0)) == {0, 1}
  assert set(draw(top_k=0, top_p=0.8)) == {0, 1}  # 0.5 + 0.3 reaches 0.8
  assert set(draw(top_k=0, top_p=0.81)) == {0, 1, 2}
  freq = np.bincount(draw(top_k=0, top_p=1.0), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  # temperature sharpens: at 0.25 the top token dominates
  hot = np.asarray(gen._filter_and_sample(logits, 0.25, 0, 1.0, jax.random.key(1)))
  assert (hot == 0).mean() > 0.85


def test_sampling_is_reproducible_and_rng_dependent(models):
  m = models["llama"]
  ids, mask = _prefix("llama")

  def run(seed):
    return np.asarray(
      generate(
        m,
        input_ids=j(ids),
        attention_mask=j(mask),
        max_new_tokens=T_NEW,
        method="sample",
        temperature=1.5,
        rng=jax.random.key(seed),
      )["tokens"]
    )

  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_compiled_once_per_shape_any_padding_and_empty_rows_rejected(models):
  m = models["llama"]
  ids, mask = _prefix("llama", seed=5)
  generate(m, input_ids=j(ids), attention_mask=j(mask), max_new_tokens=T_NEW)
  n = gen._generate._cache_size()
  generate(m, input_ids=j(ids) + 1, attention_mask=j(mask), max_new_tokens=T_NEW)
  assert gen._generate._cache_size() == n
  # padding after the tokens (or in the middle) decodes as the unpadded row: the first new token comes from
  # the last real slot, positions count real slots only
  row = jnp.array([[5, 9, 3]])
  alone = generate(m, input_ids=row, max_new_tokens=T_NEW)["tokens"]
  for padded, pmask in (([[5, 9, 3, 0, 0]], [[1, 1, 1, 0, 0]]), ([[5, 0, 9, 3, 0]], [[1, 0, 1, 1, 0]])):
    out = generate(m, input_ids=jnp.array(padded), attention_mask=jnp.array(pmask), max_new_tokens=T_NEW)
    np.testing.assert_array_equal(out["tokens"], alone)
  with pytest.raises(ValueError, match="row 1 is all padding"):
    generate(
      m, input_ids=jnp.ones((2, 4), jnp.int32), attention_mask=jnp.array([[1, 1, 1, 0], [0, 0, 0, 0]]), max_new_tokens=2
    )


def test_sharded_generation_matches_single_device(gen_dirs, models):
  mesh = shd.make_mesh(data=2, model=4)
  sharded = jaxprompt.load_model(gen_dirs["llama"], mesh=mesh)
  ids, mask = _prefix("llama", b=4)

  def put(x):
    return jax.device_put(j(x), shd.batch_sharding(mesh))

  for method in ("greedy", "beam"):
    want = generate(models["llama"], input_ids=j(ids), attention_mask=j(mask), max_new_tokens=6, method=method)
    got = generate(sharded, input_ids=put(ids), attention_mask=put(mask), max_new_tokens=6, method=method)
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(want["tokens"]))
    np.testing.assert_allclose(np.asarray(got["scores"]), np.asarray(want["scores"]), rtol=1e-5)
    assert got["tokens"].sharding.spec[0] == "data"
