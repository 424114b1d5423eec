"""T5 family: logits against transformers' PyTorch T5 (the reference), strict loading, sharding, dtypes."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxprompt
from jaxprompt import sharding as shd
from jaxprompt.models import hf
from tests.helpers_hf import T5_VARIANTS, load_t5, rewrite_checkpoint, write_t5

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened


@pytest.fixture(scope="session")
def t5_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5")
  return {v: write_t5(root / v, v, seed=i) for i, v in enumerate(T5_VARIANTS)}


def _batch(vocab, b=3, length=11, t=6, seed=0):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(2, vocab, (b, length), generator=g)
  mask = torch.ones(b, length, dtype=torch.long)
  mask[1, 7:] = 0  # right padding
  mask[2, :3] = 0  # left padding (T5 has relative positions; both work)
  dec = torch.randint(2, vocab, (b, t), generator=g)
  dec_mask = torch.ones(b, t, dtype=torch.long)
  dec_mask[1, 4:] = 0
  return ids, mask, dec, dec_mask


@pytest.mark.parametrize("variant", list(T5_VARIANTS))
def test_logits_match_transformers(t5_dirs, variant):
  folder = t5_dirs[variant]
  ref_model = load_t5(folder)
  ours = jaxprompt.load_model(folder)
  ids, mask, dec, dec_mask = _batch(ref_model.config.vocab_size)
  with torch.no_grad():
    ref = ref_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    embeds = ref_model.shared(ids) * 1.0
    ref_e = ref_model(
      inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
    ).logits

  def j(t):
    return jnp.asarray(t.numpy())

  got = ours(input_ids=j(ids), attention_mask=j(mask), decoder_input_ids=j(dec), decoder_attention_mask=j(dec_mask))
  assert got.shape == tuple(ref.shape) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=TOL, rtol=TOL)
  got_e = ours(
    inputs_embeds=j(embeds), attention_mask=j(mask), decoder_input_ids=j(dec), decoder_attention_mask=j(dec_mask)
  )
  np.testing.assert_allclose(np.asarray(got_e), ref_e.numpy(), atol=TOL, rtol=TOL)
  # embed() is the lookup the soft prompt is concatenated to
  np.testing.assert_allclose(np.asarray(ours.embed(j(ids))), embeds.numpy(), atol=1e-6)


def test_config_variants_are_read_from_config(t5_dirs):
  relu = jaxprompt.load_model(t5_dirs["t5-relu-tied"]).config
  assert (relu.is_gated, relu.act_name, relu.tie_word_embeddings, relu.scale_decoder_outputs) == (
    False,
    "relu",
    True,
    True,
  )
  v11 = jaxprompt.load_model(t5_dirs["t5v11-gated-untied"])
  assert (v11.config.is_gated, v11.config.act_name, v11.config.tie_word_embeddings) == (True, "gelu_new", False)
  assert v11.config.scale_decoder_outputs is False and hasattr(v11, "lm_head")
  deep = jaxprompt.load_model(t5_dirs["deep-enc-gated-silu"])
  assert deep.encoder.layers.self_attn.q.shape == (3, 32, 4, 5)
  assert deep.decoder.layers.self_attn.q.shape == (1, 32, 4, 5)
  deep_config = json.loads((t5_dirs["deep-enc-gated-silu"] / "config.json").read_text())
  assert deep.identity.fingerprint == hf.config_fingerprint(deep_config)


def test_dropout_is_active_only_with_an_rng(t5_dirs):
  m = jaxprompt.load_model(t5_dirs["t5-relu-tied"])
  ids = jnp.arange(2, 12)[None]
  dec = jnp.arange(2, 6)[None]
  a = m(ids, decoder_input_ids=dec)
  b = m(ids, decoder_input_ids=dec)
  c = m(ids, decoder_input_ids=dec, dropout_rng=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_sharded_index_folder_loads(t5_dirs, tmp_path):
  ref = load_t5(t5_dirs["t5v11-gated-untied"])
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  a = jaxprompt.load_model(t5_dirs["t5v11-gated-untied"])
  b = jaxprompt.load_model(tmp_path / "sharded")
  for (_pa, va), (_pb, vb) in zip(
    jax.tree.leaves_with_path(jax.tree.map(np.asarray, jax.tree.leaves(a))),
    jax.tree.leaves_with_path(jax.tree.map(np.asarray, jax.tree.leaves(b))),
    strict=True,
  ):
    np.testing.assert_array_equal(va, vb)


def test_strict_loading_names_the_tensor(t5_dirs, tmp_path):
  src = t5_dirs["t5v11-gated-untied"]
  key = "decoder.block.1.layer.2.DenseReluDense.wi_1.weight"
  missing = rewrite_checkpoint(src, tmp_path / "missing", lambda t: t.pop(key))
  with pytest.raises(hf.WeightError, match=f"missing tensor '{key}'"):
    jaxprompt.load_model(missing)
  extra = rewrite_checkpoint(
    src,
    tmp_path / "extra",
    lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.q.bias": np.zeros(32, np.float32)}),
  )
  with pytest.raises(hf.WeightError, match="unexpected tensor 'encoder.block.0.layer.0.SelfAttention.q.bias'"):
    jaxprompt.load_model(extra)
  bad = rewrite_checkpoint(src, tmp_path / "bad", lambda t: t.update({key: np.zeros((47, 32), np.float32)}))
  with pytest.raises(hf.WeightError, match=rf"tensor '{key}' has shape \(47, 32\), expected \(48, 32\)"):
    jaxprompt.load_model(bad)


def test_pytorch_bin_needs_explicit_opt_in(t5_dirs, tmp_path):
  ref = load_t5(t5_dirs["t5-relu-tied"])
  folder = tmp_path / "bin"
  folder.mkdir()
  shutil.copy(t5_dirs["t5-relu-tied"] / "config.json", folder)
  tied = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
  sd = {k: v for k, v in ref.state_dict().items() if k not in tied}
  torch.save(sd, folder / "pytorch_model.bin")
  with pytest.raises(hf.WeightError, match="pytorch_model.bin"):
    jaxprompt.load_model(folder)
  m = jaxprompt.load_model(folder, allow_pytorch_bin=True)
  np.testing.assert_array_equal(np.asarray(m.shared[...]), ref.shared.weight.detach().numpy())


def test_hub_download_fetches_pytorch_bin_only_when_opted_in_and_no_safetensors(tmp_path, monkeypatch):
  import huggingface_hub

  calls = []

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=()):
    calls.append(list(allow_patterns))
    local = tmp_path / repo_id.replace("/", "--")
    local.mkdir(exist_ok=True)
    (local / "config.json").write_text("{}")
    if "pytorch_model.bin" in allow_patterns:
      (local / "pytorch_model.bin").write_bytes(b"")
    return str(local)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  hf.resolve_model_dir("org/bin-only")
  assert len(calls) == 1 and "pytorch_model.bin" not in calls[0]  # a pickle is never fetched unasked
  local = hf.resolve_model_dir("org/bin-only", allow_pytorch_bin=True)
  assert "pytorch_model.bin" in calls[-1] and (local / "pytorch_model.bin").exists()
  calls.clear()
  (tmp_path / "org--has-st").mkdir()
  (tmp_path / "org--has-st" / "model.safetensors").write_bytes(b"")
  hf.resolve_model_dir("org/has-st", allow_pytorch_bin=True)
  assert len(calls) == 1  # safetensors present: the .bin is not downloaded


def test_missing_model_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    jaxprompt.load_model(tmp_path / "nope")


def test_sharded_on_2x4_mesh_matches_single_device(t5_dirs):
  folder = t5_dirs["t5v11-gated-untied"]
  mesh = shd.make_mesh(data=2, model=4)
  single = jaxprompt.load_model(folder)
  sharded = jaxprompt.load_model(folder, mesh=mesh)
  # parameters are laid out as the rules table says
  assert sharded.encoder.layers.self_attn.q[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
  assert sharded.encoder.layers.mlp.wi_0[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
  assert sharded.shared[...].sharding.spec == jax.sharding.PartitionSpec("model", None)  # vocab 96 % 4 == 0
  ids, mask, dec, dec_mask = (jnp.asarray(t.numpy()) for t in _batch(96, b=4))
  want = single(ids, mask, dec, dec_mask)

  def put(x):
    return jax.device_put(x, shd.batch_sharding(mesh))

  got = jax.jit(lambda i, m, d, dm: sharded(i, m, d, dm))(put(ids), put(mask), put(dec), put(dec_mask))
  assert got.sharding.spec[0] == "data"  # the batch stays split over the data axis
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_fsdp_mesh_shards_embed_dimension(t5_dirs):
  mesh = shd.make_mesh(fsdp=4, model=2)
  m = jaxprompt.load_model(t5_dirs["t5v11-gated-untied"], mesh=mesh)
  assert m.encoder.layers.self_attn.q[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model", None)
  shard_shapes = {s.data.shape for s in m.encoder.layers.self_attn.q[...].addressable_shards}
  assert shard_shapes == {(2, 8, 2, 8)}


def test_bfloat16_compute_stays_close_to_float32(t5_dirs):
  folder = t5_dirs["t5v11-gated-untied"]
  f32 = jaxprompt.load_model(folder)
  bf16 = jaxprompt.load_model(folder, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
  assert bf16.shared[...].dtype == jnp.bfloat16
  ids, mask, dec, dec_mask = (jnp.asarray(t.numpy()) for t in _batch(96))
  a = np.asarray(f32(ids, mask, dec, dec_mask))
  b = np.asarray(bf16(ids, mask, dec, dec_mask))
  assert b.dtype == np.float32  # logits always float32
  # measured: max |diff| 0.031 on logits of max |logit| 3.6 (bfloat16 keeps 8 mantissa bits)
  assert np.abs(a - b).max() < 0.1
  assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_save_pretrained_round_trips_through_transformers(t5_dirs, tmp_path):
  ours = jaxprompt.load_model(t5_dirs["t5v11-gated-untied"])
  out = jaxprompt.save_pretrained(ours, tmp_path / "saved")
  ref = load_t5(out)
  ids, mask, dec, dec_mask = _batch(96)
  with torch.no_grad():
    r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits.numpy()
  g = ours(*(jnp.asarray(t.numpy()) for t in (ids, mask, dec, dec_mask)))
  np.testing.assert_allclose(np.asarray(g), r, atol=TOL, rtol=TOL)
  with pytest.raises(FileExistsError):
    jaxprompt.save_pretrained(ours, out)


def test_warns_when_the_frozen_weights_do_not_leave_room_on_a_device(t5_dirs):
  from flax import nnx

  folder = t5_dirs["t5v11-gated-untied"]
  single = nnx.state(jaxprompt.load_model(folder))
  total = sum(x.nbytes for x in jax.tree.leaves(single))
  assert shd.per_device_bytes(single) == total
  mesh = shd.make_mesh(fsdp=2, model=4)
  sharded = nnx.state(jaxprompt.load_model(folder, mesh=mesh))
  held = shd.per_device_bytes(sharded)
  assert held < total / 4  # every large tensor is split 8 ways; only norms and biases are replicated
  assert shd.check_weights_fit(sharded, mesh, limit=4 * held) is None
  msg = shd.check_weights_fit(sharded, mesh, limit=held)
  assert "100% of its" in msg and "fsdp=2 model=4" in msg and "raise mesh.fsdp" in msg
  assert shd.check_weights_fit(sharded, mesh) is None  # CPU devices do not report a memory limit
