"""Real HF checkpoints as they are stored: TinyStories-656K (a real pretrained Llama whose tied head is stored
once, as `lm_head.weight`, with a safetensors metadata alias for `model.embed_tokens.weight`) against
transformers, and tied heads stored under either name (or both) in checkpoints written here."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxprompt
from jaxprompt.errors import WeightError
from jaxprompt.inference import generate
from jaxprompt.models import hf
from tests.helpers_hf import load_decoder, write_decoder

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened
TEXTS = [
  "Once upon a time, there was a little girl named Lily.",
  "Tom had a big red ball. He liked to play with it in the park with his friend Sue every day.",
  "The cat sat.",
]


# -- TinyStories-656K: a real pretrained Llama in HF format -------------------------------------


@pytest.fixture(scope="module")
def stories_dir(fixtures_dir):
  return fixtures_dir / "models" / "tinystories-656k"


@pytest.fixture(scope="module")
def stories(stories_dir):
  from transformers import AutoModelForCausalLM

  ref = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
  return jaxprompt.load_model(stories_dir), ref, jaxprompt.load_tokenizer(stories_dir)


def test_tinystories_stores_its_tied_head_once(stories_dir, stories):
  f = hf.SafetensorsFile(stories_dir / "model.safetensors")
  stored = f.keys()  # a list: a SafetensorsFile is no mapping
  assert "lm_head.weight" in stored and "model.embed_tokens.weight" not in stored
  assert f.metadata["model.embed_tokens.weight"] == "lm_head.weight"
  ours, _, _ = stories
  c = ours.config
  assert c.tie_word_embeddings and (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (128, 2, 2048)
  np.testing.assert_array_equal(np.asarray(ours.embed_tokens[...]), f.get("lm_head.weight"))


def test_tinystories_logits_match_transformers(stories):
  ours, ref, tok = stories
  tok.padding_side = "right"  # positions 0.. on every row, as transformers' forward counts them
  batch = tok(TEXTS, padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert ids[0, 0] == tok.bos_token_id == 1 and mask.sum(1).min() < ids.shape[1]  # BOS added, a padded row
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(ours(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  diff = np.abs(got[real] - want[real]).max()
  print(f"TinyStories-656K vs transformers: max |logit diff| {diff:.2e} over {int(real.sum())} real positions")
  np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=TOL)


def test_tinystories_greedy_matches_transformers_generate(stories):
  ours, ref, tok = stories
  tok.padding_side = "left"
  prompts = ["Once upon a time", "Tom had a big red ball. He liked to"]
  batch = tok(prompts, padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  with torch.no_grad():
    want = ref.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=30,
      do_sample=False,
      pad_token_id=tok.pad_token_id,
    )[:, ids.shape[1] :].numpy()
  out = generate(ours, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=30, method="greedy")
  tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  for row in range(len(prompts)):
    n = int(lengths[row])
    ref_row = want[row]
    ref_n = int(np.argmax(ref_row == tok.eos_token_id)) + 1 if (ref_row == tok.eos_token_id).any() else len(ref_row)
    assert n == ref_n, (row, n, ref_n)
    np.testing.assert_array_equal(tokens[row, :n], ref_row[:n])
  story = tok.decode(tokens[0, : int(lengths[0])], skip_special_tokens=True)
  assert len(story.split()) >= 10, story


# -- tied heads stored under either name ----------------------------------------------------------


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
  """A tiny random Llama with a tied head (transformers stores it as model.embed_tokens.weight only)."""
  return write_decoder(tmp_path_factory.mktemp("tied") / "m", "llama-tied-bias", seed=4)


def _variant(src, dst, edit, metadata=None):
  """A copy of `src` whose tensors are `edit(tensors)`, written with the given safetensors metadata."""
  shutil.copytree(src, dst)
  f = hf.SafetensorsFile(dst / "model.safetensors")
  names = f.keys()  # a list: a SafetensorsFile is no mapping
  tensors = {k: np.array(f.get(k)) for k in names}
  del f
  edit(tensors)
  hf.save_safetensors(tensors, dst / "model.safetensors", metadata={"format": "pt", **(metadata or {})})
  return dst


def _as_head(t):
  t["lm_head.weight"] = t.pop("model.embed_tokens.weight")


def _both(t):
  t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()


def _both_differ(t):
  t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1e-3


def _no_embedding(t):
  del t["model.embed_tokens.weight"]


VARIANTS = {
  "embedding-only": (lambda t: None, None),
  "head-only-with-alias": (_as_head, {"model.embed_tokens.weight": "lm_head.weight"}),
  "head-only": (_as_head, None),
  "both-names-same-tensor": (_both, None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tied_head_under_either_name_loads(tied_llama, tmp_path, variant):
  edit, metadata = VARIANTS[variant]
  folder = _variant(tied_llama, tmp_path / variant, edit, metadata)
  assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
  ref = load_decoder(tied_llama)
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(3, 96, (2, 9), generator=g)
  mask = torch.ones_like(ids)
  mask[1, 6:] = 0
  with torch.no_grad():
    want = ref(input_ids=ids, attention_mask=mask).logits.numpy()
    if metadata:  # the file is what safetensors itself writes for a shared tensor: transformers loads it too
      np.testing.assert_allclose(
        load_decoder(folder)(input_ids=ids, attention_mask=mask).logits.numpy(), want, atol=1e-6
      )
  ours = jaxprompt.load_model(folder)
  assert ours.config.tie_word_embeddings and ours.config.weight_prefix == "model."
  got = np.asarray(ours(input_ids=jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy())))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_tied_head_stored_twice_with_different_values_fails(tied_llama, tmp_path):
  folder = _variant(tied_llama, tmp_path / "m", _both_differ)
  with pytest.raises(WeightError, match="tied tensors 'model.embed_tokens.weight' and 'lm_head.weight'") as e:
    jaxprompt.load_model(folder)
  assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_metadata_alias_to_a_missing_tensor_fails(tied_llama, tmp_path):
  folder = _variant(tied_llama, tmp_path / "m", _no_embedding, {"model.embed_tokens.weight": "lm_head.weight"})
  with pytest.raises(
    WeightError,
    match="aliases tensor 'model.embed_tokens.weight' to 'lm_head.weight', which the checkpoint does not hold",
  ) as e:
    jaxprompt.load_model(folder)
  assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


def test_other_metadata_is_not_an_alias(tied_llama, tmp_path):
  """Free-form metadata (a format tag, a note) neither adds tensors nor fails."""
  folder = _variant(tied_llama, tmp_path / "m", lambda t: None, {"note": "hello", "origin": "a.b"})
  names = hf.CheckpointReader(folder).keys()
  assert "note" not in names and "origin" not in names
  jaxprompt.load_model(folder)
