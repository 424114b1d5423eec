"""Residual Prompt Tuning (`prompt.method: residual`): the reparameterisation against the authors' PyTorch module for
every option, training on T5 and Llama (only its parameters move, resuming is exact), the MLP folded into a plain
[P, H] prompt by every export (numpy, safetensors, PEFT PROMPT_TUNING with PEFT's logits), and serving."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from jaxprompt import config as C
from jaxprompt import load_prompted
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.inference import text as inference
from jaxprompt.models import layers as L
from jaxprompt.models import load_model
from jaxprompt.prompts import PromptedModel, SoftPrompt
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.prompts.residual import ResidualPrompt, ResidualSpec
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.trainer import train
from tests.helpers import jit_train_step, one_device, tiny_cfg, train_interrupted
from tests.helpers_hf import load_decoder, load_t5

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened
P, H, E = 5, 12, 7

# -- the authors' module, transcribed ----------------------------------------------------------------------------


class ResMLP(nn.Module):
  """`ResMLP` of github.com/arazd/ResidualPrompts, prompt_tuner2.py at 53087ca191db788245c0ecabd10b45a1c3b36cea,
  its MLP1 / MLP2 branch line for line (the LSTM and transformer types aside); nn.GELU is our addition to their
  relu / tanh / sigm."""

  def __init__(self, bottleneck_size, module_type="MLP1", emb_dimension=512, nonlinearity="relu", layer_norm=True,
               dropout=0.0, residual=True):  # fmt: skip
    super().__init__()
    layers = [nn.Linear(emb_dimension, bottleneck_size)]
    layers.append({"relu": nn.ReLU, "tanh": nn.Tanh, "sigm": nn.Sigmoid, "gelu": nn.GELU}[nonlinearity]())
    layers.append(nn.Linear(bottleneck_size, emb_dimension))
    if dropout > 0:
      layers.append(nn.Dropout(p=dropout))
    if layer_norm:
      layers.append(nn.LayerNorm(emb_dimension))
    if module_type == "MLP2":
      layers = layers + layers  # repeat twice
    self.module = nn.Sequential(*layers)
    self.residual = residual

  def forward(self, inputs):
    return self.module(inputs) + inputs if self.residual else self.module(inputs)


def _pass_separate_mlps(mlps, x):
  """Their `PromptTuner.pass_separate_mlps`: token i through MLP i."""
  return torch.concat([mlps[i](x[i : i + 1]) for i in range(len(mlps))])


def _torch_copy(ours: ResidualPrompt, token=None, **kw) -> ResMLP:
  """Their module holding our weights (`token`: one per-token MLP of `separate_mlps`)."""
  s = ours.options
  sigm = {"sigmoid": "sigm"}.get(s.nonlinearity, s.nonlinearity)
  ref = ResMLP(E, s.mlp_type, H, sigm, s.mlp_layer_norm, s.mlp_dropout, **kw)

  def t(a, transpose=False):
    a = np.asarray(a[...] if token is None else a[...][token])
    return torch.tensor(a.T if transpose else a)

  linears = [m for m in ref.module if isinstance(m, nn.Linear)]
  norms = [m for m in ref.module if isinstance(m, nn.LayerNorm)]
  with torch.no_grad():
    for lin, p in zip(linears, [ours.down, ours.up] * 2, strict=False):  # MLP2: the same modules twice
      lin.weight.copy_(t(p["w"], transpose=True))
      lin.bias.copy_(t(p["b"]))
    for norm in norms:
      norm.weight.copy_(t(ours.norm["scale"]))
      norm.bias.copy_(t(ours.norm["bias"]))
  return ref.eval()


def _randomised(spec: ResidualSpec, seed: int) -> ResidualPrompt:
  """A module whose every parameter is random (the layer norm too: it starts at 1 and 0)."""
  m = ResidualPrompt(jax.random.normal(jax.random.key(seed), (P, H)), spec, jax.random.key(seed + 1))
  state = nnx.state(m).to_pure_dict()
  keys = iter(jax.random.split(jax.random.key(seed + 2), 8))
  if spec.mlp_layer_norm:
    state["norm"] = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(next(keys), a.shape), state["norm"])
  nnx.update(m, state)
  return m


OPTIONS = list(itertools.product(["relu", "tanh", "sigmoid", "gelu"], [True, False], [False, True], ["MLP1", "MLP2"]))


@pytest.mark.parametrize("nonlinearity,layer_norm,separate,mlp_type", OPTIONS)
def test_reparameterisation_equals_the_authors_resmlp(nonlinearity, layer_norm, separate, mlp_type):
  """Our inference value = their module in eval mode (dropout configured, so off), for every option."""
  spec = ResidualSpec(E, nonlinearity, layer_norm, 0.2, separate, mlp_type)
  ours = _randomised(spec, seed=len(nonlinearity) + 10 * layer_norm + 100 * separate)
  x = torch.tensor(np.asarray(ours.embedding[...]))
  with torch.no_grad():
    mlps = [_torch_copy(ours, token=i) for i in range(P)] if separate else None
    ref = _pass_separate_mlps(mlps, x) if separate else _torch_copy(ours)(x)
  np.testing.assert_allclose(np.asarray(ours.inference_value()), ref.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mlp_type", ["MLP1", "MLP2"])
def test_training_dropout_sits_where_theirs_does(mlp_type):
  """In training their nn.Dropout (after the up projection, before the norm; MLP2: a fresh mask each pass) given
  our masks gives our output — and without a key (evaluation) there is none."""
  spec = ResidualSpec(E, "relu", True, 0.3, False, mlp_type)
  ours = _randomised(spec, seed=3)
  key = jax.random.key(9)
  masks = iter(L.bernoulli(k, 0.7, (P, H)) for k in L.split_rng(key, 2 if mlp_type == "MLP2" else 1))

  class Fixed(nn.Module):  # their Dropout, drawing our mask
    def forward(self, x):
      return x * torch.tensor(np.asarray(next(masks), np.float32)) / 0.7

  ref = _torch_copy(ours)
  ref.module = nn.Sequential(*[Fixed() if isinstance(m, nn.Dropout) else m for m in ref.module])
  with torch.no_grad():
    want = ref(torch.tensor(np.asarray(ours.embedding[...]))).numpy()
  np.testing.assert_allclose(np.asarray(ours.reparameterise(key)), want, atol=1e-5, rtol=1e-5)
  assert ours.uses_dropout and not np.allclose(ours.reparameterise(key), ours.inference_value())


def test_config_defaults_are_the_authors_and_options_belong_to_residual():
  cfg = C.load(None, ["prompt.method=residual"]).prompt
  from jaxprompt.prompts.residual import spec_of

  # train.py: --bottleneck_size 800, --nonlinearity relu, --mlp_layer_norm 1, --mlp_dropout 0.0, --separate_mlps 0
  assert spec_of(cfg) == ResidualSpec(800, "relu", True, 0.0, False, "MLP1")
  with pytest.raises(C.ConfigError, match="prompt.bottleneck_size applies to method residual, not p_tuning"):
    C.load(None, ["prompt.method=p_tuning", "prompt.bottleneck_size=8"])
  with pytest.raises(C.ConfigError, match="prompt.nonlinearity"):
    C.load(None, ["prompt.method=residual", "prompt.nonlinearity=swish"])


# -- training ------------------------------------------------------------------------------------------------------

RESIDUAL = {
  "prompt.method": "residual",
  "prompt.length": 3,
  "prompt.bottleneck_size": 16,
  "prompt.mlp_dropout": 0.1,
  "model.dropout": 0.1,
}


@pytest.mark.parametrize("model", ["t5", "llama"])
def test_only_the_residual_prompt_trains_and_the_loss_falls(byte_t5, byte_llama, model):
  """Optimizer state for the embedding and MLP only, each of them moves, the frozen weights stay bitwise, and the
  loss on one repeated batch falls."""
  from jaxprompt.data.pipeline import BatchStream

  over = {**RESIDUAL, "prompt.separate_mlps": model == "llama", "optimizer.learning_rate": 0.05}
  cfg = tiny_cfg({"t5": byte_t5, "llama": byte_llama}[model], **over)
  run, (data,) = build_run(cfg, mesh=one_device())
  assert set(run.prompt["prompt"]) == {"embedding", "down", "up", "norm"}
  tx = build_optimizer(cfg.optimizer, cfg.train.steps)
  step, opt = jit_train_step(run, tx, z_loss=1e-4)
  shapes = {x.shape for x in jax.tree.leaves(run.prompt)}
  assert all(x.size <= 1 or x.shape in shapes or x.ndim == 1 for x in jax.tree.leaves(opt))
  assert sum(x.size for x in jax.tree.leaves(opt)) <= sum(x.size for x in jax.tree.leaves(run.prompt)) + 64
  frozen_before = jax.tree.map(np.asarray, run.frozen)
  batch = run.device_batch(next(BatchStream(run.encode(data.examples, "train"), cfg.train.batch_size)))
  prompt, losses = run.prompt, []
  for i in range(6):
    prompt, opt, m = step(prompt, opt, run.frozen, batch, jnp.asarray(i))
    losses.append(float(m["loss"]))
  print(f"{model}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert losses[-1] < losses[0]
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(prompt), jax.tree.leaves(run.prompt), strict=True)]
  assert all(moved), moved
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.tree.map(np.asarray, run.frozen)), strict=True):
    np.testing.assert_array_equal(a, b)


def test_resuming_is_exact_with_the_mlp_and_its_dropout(byte_t5, tmp_path):
  """The checkpoint keeps the MLP (an export keeps its output only), and the MLP's dropout keys follow the step: an
  interrupted run resumes to the uninterrupted one's parameters, bit for bit."""
  over = {**RESIDUAL, "prompt.mlp_type": "MLP2"}
  train_interrupted(tiny_cfg(byte_t5, **over), tiny_cfg(byte_t5, **over, **{"train.steps": 3}), tmp_path, one_device())
  a, b = (Checkpointer.reader(tmp_path / w / "checkpoints").restore_prompt(6)[0] for w in ("full", "split"))
  assert set(a["prompt"]) == {"embedding", "down", "up", "norm"}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_bank_of_residual_prompts_is_a_one_line_error(byte_t5):
  mixture = [{"task": "quickstart:max"}, {"task": "quickstart:min"}]
  cfg = tiny_cfg(byte_t5, **RESIDUAL, **{"prompt.per_task": True, "data.mixture": mixture})
  with pytest.raises(C.ConfigError, match="prompt.per_task: a bank of residual prompt MLPs is not supported"):
    build_run(cfg, mesh=one_device())


# -- export: the MLP folded away -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["t5", "llama"])
def trained(request, byte_t5, byte_llama, tmp_path_factory):
  folder = {"t5": byte_t5, "llama": byte_llama}[request.param]
  root = tmp_path_factory.mktemp(f"residual_{request.param}")
  cfg = tiny_cfg(folder, **RESIDUAL, **{"train.steps": 3})
  train(cfg, root / "w", progress=False, mesh=one_device())
  return request.param, folder, root


def _batch(seq2seq: bool):
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(3, 200, (3, 7), generator=g)
  mask = torch.ones_like(ids)
  mask[1, 5:] = 0  # a padded row
  return ids, mask, (torch.randint(3, 200, (3, 4), generator=g) if seq2seq else None)


def _logits(model, seq2seq: bool) -> np.ndarray:
  ids, mask, dec = (None if x is None else jnp.asarray(x.numpy()) for x in _batch(seq2seq))
  return np.asarray(model(ids, mask, dec) if seq2seq else model(ids, mask))


def test_exports_fold_the_mlp_into_a_plain_prompt_with_the_trained_logits(trained):
  from peft import PeftModel

  kind, folder, root = trained
  seq2seq = kind == "t5"
  src = load_prompt_source(root / "w")
  assert src.method == "residual" and {"down", "up", "norm"} <= set(src.params)
  module = ResidualPrompt(src.params["embedding"], src.spec, jax.random.key(0))
  nnx.update(module, jax.tree.map(jnp.asarray, src.params))
  folded = np.asarray(module.inference_value())
  np.testing.assert_array_equal(src.value, folded)
  trained_logits = _logits(PromptedModel(load_model(folder), module), seq2seq)
  exports = {
    "numpy": export_prompt(root / "w", "numpy", root / "p.npy"),
    "safetensors": export_prompt(root / "w", "safetensors", root / "p.safetensors"),
    "peft": export_prompt(root / "w", "peft", root / "adapter"),
  }
  for fmt, path in exports.items():
    tp = load_prompt_source(path)
    assert tp.value.shape == (3, 32), fmt
    np.testing.assert_array_equal(tp.value, folded)
    # numpy / safetensors say residual; PEFT's adapter is PROMPT_TUNING, which reads back as prompt_tuning
    assert tp.method == ("prompt_tuning" if fmt == "peft" else "residual"), fmt
    loaded = load_prompted(folder, path)
    assert isinstance(loaded.prompt, SoftPrompt)
    np.testing.assert_allclose(_logits(loaded, seq2seq), trained_logits, atol=1e-5, rtol=1e-5)
  assert json.loads((root / "p.json").read_text())["prompt_spec"]["method"] == "residual"
  acfg = json.loads((exports["peft"] / "adapter_config.json").read_text())
  assert (acfg["peft_type"], acfg["num_virtual_tokens"], acfg["token_dim"]) == ("PROMPT_TUNING", 3, 32)
  assert json.loads((exports["peft"] / "jaxprompt.json").read_text())["prompt_spec"]["method"] == "residual"
  peft_model = PeftModel.from_pretrained((load_t5 if seq2seq else load_decoder)(folder), exports["peft"]).eval()
  ids, mask, dec = _batch(seq2seq)
  with torch.no_grad():
    ref = peft_model(input_ids=ids, attention_mask=mask, **({"decoder_input_ids": dec} if seq2seq else {})).logits
  ref = ref.numpy()[:, 0 if seq2seq else 3 :]  # a decoder's PEFT logits include the virtual tokens'
  np.testing.assert_allclose(trained_logits, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("trained", ["llama"], indirect=True)  # served once, on the decoder
def test_served_residual_prompts_equal_generate(trained, tmp_path):
  """A residual workdir and its safetensors export in a prompts folder, through the OpenAI client, give
  `jaxprompt generate --greedy`'s text (the function it calls) for the workdir."""
  pytest.importorskip("fastapi")
  openai = pytest.importorskip("openai")
  from jaxprompt.serve.server import build, serving

  _, folder, root = trained
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  (prompts / "work").symlink_to(root / "w")
  export_prompt(root / "w", "safetensors", prompts / "st.safetensors")
  app, engine, problems = build(str(folder), prompts=str(prompts), max_batch=4, max_tokens=16, max_input_tokens=32)
  assert problems == []
  texts = ["max: 3 7 1 8 2", "hello there", "a"]
  want = [
    r["output"]
    for r in inference.generate_text(
      engine.base, engine.tokenizer, texts, [load_prompt_source(root / "w")], max_new_tokens=6
    )
  ]
  with serving(app) as url:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for name in ("work", "st"):
      got = client.completions.create(model=name, prompt=texts, max_tokens=6, temperature=0)
      assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want, name
