"""Soft prompts: each initialiser's semantics, prompt files, and how the prompt joins the input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import config as C
from jaxprompt import prompts as P
from jaxprompt.models import hf
from jaxprompt.models import layers as L
from jaxprompt.prompts import init as PI
from jaxprompt.prompts import io as PIO


@pytest.fixture(scope="module")
def table():
  return jax.random.normal(jax.random.key(0), (50, 8))


def test_random_uniform_range_and_default_is_the_papers():
  x = np.asarray(PI.random_uniform(jax.random.key(1), 100, 16, *C.PromptConfig().init_range))
  assert x.shape == (100, 16) and x.dtype == np.float32
  assert x.min() >= -0.5 and x.max() < 0.5 and x.min() < -0.45 and x.max() > 0.45
  y = np.asarray(PI.random_uniform(jax.random.key(1), 100, 16, 0.0, 0.5))  # the original code's range
  assert y.min() >= 0.0 and y.max() < 0.5


def test_sampled_vocab_rows_come_from_the_first_n_rows(table):
  x = np.asarray(PI.sampled_vocab(jax.random.key(2), table, 10, population=20))
  t = np.asarray(table)
  idx = [int(np.argmin(np.abs(t - row).sum(-1))) for row in x]
  for row, i in zip(x, idx, strict=True):
    np.testing.assert_array_equal(row, t[i])
  assert max(idx) < 20 and len(set(idx)) == 10  # without replacement while possible


def test_class_labels_rows_are_mean_subtoken_embeddings(table):
  labels = [[3], [4, 5, 6], [7, 8]]
  x = np.asarray(PI.class_labels(jax.random.key(3), table, 6, labels, population=40))
  t = np.asarray(table)
  np.testing.assert_allclose(x[0], t[3], rtol=0, atol=0)
  np.testing.assert_allclose(x[1], t[[4, 5, 6]].mean(0), atol=1e-7)
  np.testing.assert_allclose(x[2], t[[7, 8]].mean(0), atol=1e-7)
  for row in x[3:]:  # the rest: sampled vocabulary rows
    assert np.min(np.abs(t[:40] - row).sum(-1)) == 0
  with pytest.raises(P.PromptError, match="do not fit"):
    PI.class_labels(jax.random.key(3), table, 2, labels, C.PromptConfig().vocab_sample_size)


def test_text_init_repeats_or_cuts(table):
  t = np.asarray(table)
  np.testing.assert_array_equal(np.asarray(PI.from_text(table, 5, [1, 2])), t[[1, 2, 1, 2, 1]])
  np.testing.assert_array_equal(np.asarray(PI.from_text(table, 2, [1, 2, 3])), t[[1, 2]])


def test_file_init_npy_and_peft_folder_with_shape_checks(tmp_path):
  value = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  np.save(tmp_path / "p.npy", value)
  np.testing.assert_array_equal(np.asarray(PIO.from_file(tmp_path / "p.npy", 4, 8)), value)
  with pytest.raises(P.PromptError, match=r"shape \(4, 8\), expected \[P, H\] = \(5, 8\)"):
    PIO.from_file(tmp_path / "p.npy", 5, 8)
  peft = tmp_path / "adapter"
  peft.mkdir()
  hf.save_safetensors({"prompt_embeddings": value}, peft / "adapter_model.safetensors")
  (peft / "adapter_config.json").write_text(
    json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4})
  )
  np.testing.assert_array_equal(np.asarray(PIO.from_file(peft, 4, 8)), value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    PIO.from_file(tmp_path / "nope.npy", 4, 8)


def test_prepend_extends_mask_with_ones():
  prompt = jnp.ones((3, 4))
  emb = jnp.zeros((2, 5, 4))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  x, m = L.prepend(prompt, emb, mask)
  assert x.shape == (2, 8, 4)
  np.testing.assert_array_equal(np.asarray(x[:, :3]), 1.0)
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])


def test_mixed_prompt_batch_equals_each_prompt_alone(tmp_path_factory):
  """A prompt bank [K, P, H]: every example picks its prompt by id inside one jitted call."""
  from jaxprompt.models import load_model
  from tests.helpers_hf import write_t5

  folder = write_t5(tmp_path_factory.mktemp("mixed") / "m", "t5v11-gated-untied", seed=5)
  base = load_model(folder)
  bank = jax.random.normal(jax.random.key(0), (3, 4, 32))
  ids = jax.random.randint(jax.random.key(1), (6, 7), 2, 96)
  mask = jnp.ones((6, 7), jnp.int32).at[2, 5:].set(0)
  dec = jax.random.randint(jax.random.key(2), (6, 3), 2, 96)
  which = jnp.array([2, 0, 1, 1, 0, 2])
  bank_model = P.PromptedModel(base, P.prompt_bank(list(bank)))
  got = jax.jit(lambda i, m, d, w: bank_model(i, m, d, prompt_ids=w))(ids, mask, dec, which)
  for k in range(3):
    rows = np.where(np.asarray(which) == k)[0]
    single = P.PromptedModel(base, P.SoftPrompt(bank[k]))
    want = single(ids[rows], mask[rows], dec[rows])
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want), atol=1e-5, rtol=1e-5)
