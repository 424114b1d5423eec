"""GGUF loading against reality: karpathy's stories260K (a real pretrained Llama) and a PyTorch reference.

The reference `LlamaForCausalLM` gets its state dict straight from the file's tensors, with q/k converted
from Meta's interleaved-RoPE layout by transformers' own recipe (convert_llama_weights_to_hf's `permute`,
Meta -> HF), written out here independently of `jaxprompt.models.gguf`.
"""

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxprompt
from jaxprompt import sharding as shd
from jaxprompt.inference import generate
from jaxprompt.models import gguf as G
from jaxprompt.models import hf

pytest.importorskip("gguf", reason="GGUF support needs the gguf package")

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened
STORY = "Once upon a time, there was a little girl named Lily"


@pytest.fixture(scope="session")
def gguf_path(fixtures_dir):
  return fixtures_dir / "models" / "stories260K" / "stories260K.gguf"


@pytest.fixture(scope="session")
def ours(gguf_path):
  return jaxprompt.load_model(gguf_path)


@pytest.fixture(scope="session")
def reference(gguf_path):
  import gguf
  from transformers import LlamaConfig, LlamaForCausalLM

  r = gguf.GGUFReader(gguf_path)
  t = {x.name: torch.tensor(np.array(x.data)) for x in r.tensors}

  def unpermute(w, heads):  # rows of each head: interleaved (x0 y0 x1 y1 ...) -> halves (x0 x1 ... y0 y1 ...)
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

  eps = float(r.fields["llama.attention.layer_norm_rms_epsilon"].contents())
  cfg = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=5,
    num_attention_heads=8,
    num_key_value_heads=4,
    rms_norm_eps=eps,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  sd = {
    "model.embed_tokens.weight": t["token_embd.weight"],
    "model.norm.weight": t["output_norm.weight"],
    "lm_head.weight": t["output.weight"],
  }
  for i in range(5):
    b, h = f"blk.{i}.", f"model.layers.{i}."
    sd.update(
      {
        h + "self_attn.q_proj.weight": unpermute(t[b + "attn_q.weight"], 8),
        h + "self_attn.k_proj.weight": unpermute(t[b + "attn_k.weight"], 4),
        h + "self_attn.v_proj.weight": t[b + "attn_v.weight"],
        h + "self_attn.o_proj.weight": t[b + "attn_output.weight"],
        h + "mlp.gate_proj.weight": t[b + "ffn_gate.weight"],
        h + "mlp.up_proj.weight": t[b + "ffn_up.weight"],
        h + "mlp.down_proj.weight": t[b + "ffn_down.weight"],
        h + "input_layernorm.weight": t[b + "attn_norm.weight"],
        h + "post_attention_layernorm.weight": t[b + "ffn_norm.weight"],
      }
    )
  model = LlamaForCausalLM(cfg).eval()
  model.load_state_dict(sd, strict=True)
  return model


def test_config_and_layout(gguf_path, ours):
  c = ours.config
  assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
    64,
    5,
    8,
    4,
    8,
  )
  assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.bos_token_id, c.eos_token_id) == (172, 512, 10000.0, 1, 2)
  assert c.pad_token_id is None  # stored as 0xFFFFFFFF, i.e. none
  assert abs(c.norm_eps - 1e-5) < 1e-10
  # ggml lists dims innermost first: attn_k is ne=[64, 32], a [32, 64] = [out, in] array in numpy order
  f = G.GGUFFile(gguf_path)
  assert f.shape("blk.0.attn_k.weight") == (32, 64) and f.get("blk.0.attn_k.weight").shape == (32, 64)
  assert ours.layers.attn.k.shape == (5, 64, 4, 8) and ours.lm_head.shape == (64, 512)
  np.testing.assert_array_equal(np.asarray(ours.embed_tokens[...]), f.get("token_embd.weight"))
  w = f.get("blk.2.attn_q.weight")
  np.testing.assert_array_equal(G._rope_to_gguf(G._rope_to_ours(w, (64, 8, 8))), w)
  assert ours.identity.path == str(gguf_path) and ours.identity.model_type == "llama"
  assert len(ours.identity.fingerprint) == 16


def test_logits_match_pytorch_reference(ours, reference):
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(3, 512, (3, 24), generator=g)
  ids[:, 0] = 1
  mask = torch.ones_like(ids)
  mask[1, 18:] = 0
  with torch.no_grad():
    ref = reference(input_ids=ids, attention_mask=mask).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=TOL)


def test_greedy_story_matches_reference_generate(gguf_path, ours, reference):
  tok = jaxprompt.load_tokenizer(gguf_path)
  with torch.no_grad():
    ref = reference.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False)[0, 1:].numpy()
  out = generate(ours, input_ids=jnp.array([[1]]), max_new_tokens=200, method="greedy")
  got = np.asarray(out["tokens"])[0]
  n = int(out["lengths"][0])
  assert n == len(ref)  # both stop at the same EOS, or both run the full 200
  np.testing.assert_array_equal(got[:n], ref)
  text = tok.decode(got[:n], skip_special_tokens=True)
  assert text.startswith(STORY), text[:120]


def test_tokenizer_from_the_file(gguf_path, fixtures_dir):
  import sentencepiece as spm

  tok = jaxprompt.load_tokenizer(gguf_path)
  # llama.cpp adds BOS for SentencePiece vocabularies (the file sets no add_bos_token flag)
  assert tok("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]
  assert tok("Once upon a time", add_special_tokens=False)["input_ids"] == [403, 407, 261, 378]
  assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, None)
  sp = spm.SentencePieceProcessor(model_file=str(fixtures_dir / "models" / "stories260K" / "tok512.model"))
  for text in ("Once upon a time", "Lily and Ben went to the park.  Two spaces!", "héllo wörld 123\nnew line"):
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def _copy_gguf(src, dst, edit):
  """Rewrite a GGUF file with `edit(tensors)` applied to its {name: array} dict; metadata unchanged."""
  import gguf

  r = gguf.GGUFReader(src)
  w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
  for key, f in r.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
      continue
    sub = f.types[1] if len(f.types) > 1 else None
    w.add_key_value(key, f.contents(), f.types[0], sub)
  tensors = {t.name: np.array(t.data) for t in r.tensors}
  edit(tensors)
  for name, a in tensors.items():  # an array, or (quantized bytes, GGML type)
    if isinstance(a, tuple):
      w.add_tensor(name, a[0], raw_dtype=a[1])
    else:
      w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return dst


def test_strict_loading_names_the_tensor(gguf_path, ours, tmp_path):
  same = _copy_gguf(gguf_path, tmp_path / "same.gguf", lambda t: None)
  np.testing.assert_array_equal(
    np.asarray(jaxprompt.load_model(same).layers.attn.q[...]), np.asarray(ours.layers.attn.q[...])
  )
  missing = _copy_gguf(gguf_path, tmp_path / "missing.gguf", lambda t: t.pop("blk.3.ffn_up.weight"))
  with pytest.raises(hf.WeightError, match="missing tensor 'blk.3.ffn_up.weight'"):
    jaxprompt.load_model(missing)
  extra = _copy_gguf(
    gguf_path, tmp_path / "extra.gguf", lambda t: t.update({"blk.0.attn_q.bias": np.zeros(64, np.float32)})
  )
  with pytest.raises(hf.WeightError, match="unexpected tensor 'blk.0.attn_q.bias'"):
    jaxprompt.load_model(extra)
  bad = _copy_gguf(
    gguf_path, tmp_path / "bad.gguf", lambda t: t.update({"blk.1.attn_k.weight": np.zeros((64, 64), np.float32)})
  )
  with pytest.raises(hf.WeightError, match=r"tensor 'blk.1.attn_k.weight' has shape \(64, 64\), expected \(32, 64\)"):
    jaxprompt.load_model(bad)
  # no output.weight: the head is tied to the embedding, as llama.cpp does
  tied = jaxprompt.load_model(_copy_gguf(gguf_path, tmp_path / "tied.gguf", lambda t: t.pop("output.weight")))
  assert tied.config.tie_word_embeddings and not hasattr(tied, "lm_head")
  ids = jnp.array([[1, 403, 407, 261, 378]])
  np.testing.assert_allclose(np.asarray(tied(ids)), np.asarray(ours(ids)), atol=1e-6)  # the file's copy is equal


def test_sharded_gguf_matches_single_device(gguf_path, ours):
  mesh = shd.make_mesh(data=2, model=4)
  sharded = jaxprompt.load_model(gguf_path, mesh=mesh)
  assert sharded.layers.attn.q[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)
  ids = jnp.tile(jnp.array([[1, 403, 407, 261, 378, 261]]), (4, 1))
  got = jax.jit(lambda i: sharded(i))(jax.device_put(ids, shd.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ours(ids)), atol=1e-5, rtol=1e-5)


def test_half_and_quantized_tensors(gguf_path, ours, tmp_path):
  """F16 (memory-mapped), BF16 and Q8_0 (dequantized) tensors land in the right places: every element is
  within its format's rounding error of the float32 file (a layout slip would be off by whole weights)."""
  import gguf

  types = {
    "attn_q": gguf.GGMLQuantizationType.Q8_0,
    "attn_k": gguf.GGMLQuantizationType.Q8_0,
    "attn_v": gguf.GGMLQuantizationType.BF16,
    "ffn_gate": gguf.GGMLQuantizationType.F16,
  }

  def quantize(t):
    for name in list(t):
      kind = types.get(name.split(".")[-2]) if name.startswith("blk.") else None
      if kind == gguf.GGMLQuantizationType.F16:
        t[name] = t[name].astype(np.float16)
      elif kind is not None:
        t[name] = (gguf.quantize(t[name], kind), kind)

  m = jaxprompt.load_model(_copy_gguf(gguf_path, tmp_path / "q.gguf", quantize))
  for path, rel in (("attn.q", 1 / 127), ("attn.k", 1 / 127), ("attn.v", 2**-8), ("mlp.wi_0", 2**-10)):
    get = operator.attrgetter(f"layers.{path}")
    a, b = np.asarray(get(m)[...]), np.asarray(get(ours)[...])
    assert 0 < np.abs(a - b).max() <= rel * np.abs(b).max(), path
  ids = jnp.array([[1, 403, 407, 261, 378, 261]])
  assert (np.asarray(m(ids)).argmax(-1) == np.asarray(ours(ids)).argmax(-1)).all()
