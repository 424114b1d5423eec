"""`jaxprompt serve --mesh / --dtype`: the frozen base's weights placed through the rules table on 8 simulated CPU
devices (conftest) give the same greedy completions and /v1/classify scores as on one device, for a decoder and
T5; bfloat16 weights serve what `jaxprompt generate` gives with the same weights. Servers bind 127.0.0.1 on a free
port and are always stopped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprompt

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from jaxprompt import sharding as shd  # noqa: E402
from jaxprompt.errors import UsageError  # noqa: E402
from jaxprompt.inference import text as T  # noqa: E402
from jaxprompt.prompts.io import load_prompt_source  # noqa: E402

TEXTS = ["max: 3 7 1 8 2", "hello there", "a"]
LABELS = ["yes", "no", "maybe"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
  """A soft prompt [4, 32] (both tiny bases have H = 32)."""
  folder = tmp_path_factory.mktemp("sharded_prompts")
  np.save(folder / "soft.npy", np.random.default_rng(2).normal(size=(4, 32)).astype(np.float32))
  return folder


def _serve(model, prompts, mesh=None, dtype="float32", classify=True):
  """(greedy completions under the soft prompt, its classify scores [inputs, labels] or None, the engine's base)
  from a server over `model`."""
  from jaxprompt.serve.server import build, serving

  app, engine, problems = build(
    str(model),
    prompts=str(prompts),
    name="base",
    mesh=mesh,
    dtype=dtype,
    max_batch=4,
    max_tokens=8,
    max_input_tokens=16,
  )
  assert problems == []
  with serving(app) as url, httpx.Client(timeout=120) as c:
    r = c.post(url + "/v1/completions", json=dict(model="soft", prompt=TEXTS, max_tokens=8, temperature=0))
    assert r.status_code == 200, r.text
    texts = [ch["text"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])]
    scores = None
    if classify:
      r = c.post(url + "/v1/classify", json=dict(model="soft", input=TEXTS, labels=LABELS))
      assert r.status_code == 200, r.text
      scores = np.asarray([[d["scores"][lab] for lab in LABELS] for d in r.json()["data"]])
  return texts, scores, engine.base


def _assert_sharded(base, devices: int) -> None:
  """Every weight lives on `devices` devices and no device holds them all."""
  state = nnx.state(base)
  leaves = jax.tree.leaves(state)
  assert all(len(x.sharding.device_set) == devices for x in leaves)
  total = sum(x.nbytes for x in leaves)
  assert shd.per_device_bytes(state) < total / 2, (shd.per_device_bytes(state), total)


@pytest.mark.parametrize("kind", ["decoder", "t5"])
def test_sharded_base_serves_the_single_device_answers(kind, byte_llama, byte_t5, prompts):
  assert jax.device_count() == 8  # conftest's simulated devices
  model = byte_llama if kind == "decoder" else byte_t5
  want_texts, want_scores, one = _serve(model, prompts)
  assert len(jax.tree.leaves(nnx.state(one))[0].sharding.device_set) == 1
  assert any(want_texts)
  for mesh in ("model=8", "fsdp=8" if kind == "decoder" else "data=1,fsdp=2,model=4"):
    texts, scores, base = _serve(model, prompts, mesh=mesh)
    _assert_sharded(base, 8)
    assert texts == want_texts, mesh
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5, err_msg=mesh)


def test_bfloat16_weights_on_a_mesh_serve_generate_s_text(byte_llama, prompts):
  texts, _, base = _serve(byte_llama, prompts, mesh="fsdp=2,model=4", dtype="bfloat16", classify=False)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(base))} == {jnp.dtype(jnp.bfloat16)}
  _assert_sharded(base, 8)
  single = jaxprompt.load_model(byte_llama, dtype=jnp.bfloat16)
  tokenizer = jaxprompt.load_tokenizer(byte_llama)
  want = T.generate_text(single, tokenizer, TEXTS, [load_prompt_source(prompts / "soft.npy")], max_new_tokens=8)
  assert texts == [r["output"] for r in want]


@pytest.mark.parametrize(
  ("mesh", "dtype", "says"),
  [
    ("model=16", "float32", "needs 16 devices"),
    ("model:8", "float32", "expected data=N,fsdp=N,model=N"),
    (None, "float16", "--dtype 'float16'"),
  ],
)
def test_a_mesh_or_dtype_that_cannot_be_used_is_one_line_naming_the_flag(byte_llama, mesh, dtype, says):
  from jaxprompt.serve.server import load_base

  with pytest.raises(UsageError) as e:
    load_base(str(byte_llama), mesh=mesh, dtype=dtype)
  assert says in str(e.value) and "\n" not in str(e.value)
  assert str(e.value).startswith("--mesh" if mesh else "--dtype")
