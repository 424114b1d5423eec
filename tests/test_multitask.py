"""Multitask prompt tuning (PEFT's MULTITASK_PROMPT_TUNING) on a tiny Llama (GQA): adapters PEFT made load with
PEFT's logits per task id (padded batches); a two-task mixture trains the shared prompt and both factors in one
run, resumes exactly and moves nothing else; its exports (one PEFT adapter per task, and one of both) give PEFT
our logits and greedy generations, and each task's prompt scores alone what the mixture reported; the source ->
target inits match PEFT's; a T5 multitask prompt runs here (its products before the encoder) and its PEFT export
is refused in one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxprompt import config as C
from jaxprompt import load_prompted
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.cli import main
from jaxprompt.data import encoding
from jaxprompt.errors import ExportError, PromptError
from jaxprompt.evaluation.evaluator import evaluator_for
from jaxprompt.inference import text as inference
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.prompts.methods import fixed
from jaxprompt.prompts.multitask import MultitaskSpec, unpack
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from tests.helpers import one_device, tiny_cfg, train_interrupted

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md)
P, R = 4, 2
MAX, MIN = "quickstart:max", "quickstart:min"
TEXTS = ["3 7 1 8 2", "hi", "a somewhat longer input, 42"]
MPT = {"prompt.method": "multitask", "prompt.length": P, "prompt.multitask_rank": R}
MIX = {**MPT, "data.mixture": [{"task": MAX}, {"task": MIN}], "prompt.per_task": True}


def _t(a):
  return torch.tensor(np.asarray(a), dtype=torch.long)


def _peft(folder, adapter):
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter).eval()


def _layouts(base, tok):
  """(ids, mask) right-padded (training) and left-padded (generation)."""
  right = tok(TEXTS, padding=True, return_tensors="np")
  return [(right["input_ids"], right["attention_mask"]), encoding.encode_inputs(base.batch_type, tok, TEXTS)]


def _peft_logits(peft_model, ids, mask, tasks):
  with torch.no_grad():
    return peft_model(input_ids=_t(ids), attention_mask=_t(mask), task_ids=_t(tasks)).logits.numpy()


@pytest.fixture(scope="module")
def peft_made(byte_llama, tmp_path_factory):
  """A MULTITASK_PROMPT_TUNING adapter of 3 tasks made by PEFT (its factors drawn N(0, 1): PEFT's N(0, 0.02)
  would make every task's prompt nearly zero)."""
  from peft import MultitaskPromptTuningConfig, TaskType, get_peft_model
  from transformers import AutoModelForCausalLM

  torch.manual_seed(0)
  cfg = MultitaskPromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, num_tasks=3, num_ranks=R)
  model = get_peft_model(AutoModelForCausalLM.from_pretrained(byte_llama), cfg)
  with torch.no_grad():
    model.prompt_encoder["default"].prefix_task_cols.normal_()
    model.prompt_encoder["default"].prefix_task_rows.normal_()
  out = tmp_path_factory.mktemp("mpt_peft") / "adapter"
  model.save_pretrained(out)
  return out


def test_a_peft_made_adapter_gives_peft_logits_for_every_task_id(byte_llama, peft_made):
  from safetensors.numpy import load_file

  stored = load_file(peft_made / "adapter_model.safetensors")
  assert {k: v.shape for k, v in stored.items()} == {
    "prompt_embeddings": (P, 32),
    "prefix_task_cols": (3, P, R),
    "prefix_task_rows": (3, R, 32),
  }
  peft_model = _peft(byte_llama, peft_made)
  model = load_prompted(byte_llama, peft_made)  # three tasks: a bank, rows choose by prompt_ids
  tasks = np.array([2, 0, 1])
  diff = 0.0
  for ids, mask in _layouts(model.base, _tok(byte_llama)):
    ref = _peft_logits(peft_model, ids, mask, tasks)
    ours = np.asarray(model.full_logits(jnp.asarray(ids), jnp.asarray(mask), prompt_ids=jnp.asarray(tasks)))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)
    diff = max(diff, np.abs(ours - ref).max())
    # one task by its id, as PEFT's task_ids
    alone = load_prompted(byte_llama, f"{peft_made}@1")
    np.testing.assert_allclose(
      np.asarray(alone.full_logits(jnp.asarray(ids), jnp.asarray(mask))),
      _peft_logits(peft_model, ids, mask, np.ones(3, int)),
      atol=TOL,
      rtol=TOL,
    )
  print(f"PEFT-made MPT adapter (3 tasks): max |logit diff| {diff:.2e}")
  tp = load_prompt_source(f"{peft_made}@2")
  shared, cols, rows = unpack(tp.value, tp.spec)
  np.testing.assert_array_equal(shared, stored["prompt_embeddings"])
  np.testing.assert_array_equal(cols, stored["prefix_task_cols"][2])
  np.testing.assert_array_equal(rows, stored["prefix_task_rows"][2])
  with pytest.raises(PromptError, match=r"holds one prompt per task \(0, 1, 2\): choose one"):
    load_prompt_source(peft_made)
  # served: one prompt per task of the one adapter, each its task's product (a soft prompt)
  from jaxprompt.serve.engine import PromptStore

  store = PromptStore(model.base)
  assert store.load_dir(peft_made.parent) == [] and store.names() == ["adapter.0", "adapter.1", "adapter.2"]
  assert store.get("adapter.2").method == "multitask"


def _tok(folder):
  from jaxprompt.models.loading import load_tokenizer

  return load_tokenizer(str(folder))


# -- a two-task mixture, trained here -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture(byte_llama, tmp_path_factory):
  """A two-task multitask run interrupted at step 3 and resumed, the same run without the interruption (evaluated
  at its end), and its PEFT export."""
  root = tmp_path_factory.mktemp("mpt_mix")
  over = {**MIX, "optimizer.name": "adam", "optimizer.learning_rate": 0.05}
  full = tiny_cfg(byte_llama, **over, **{"eval.at_end": True, "eval.max_examples": 24})
  train_interrupted(full, tiny_cfg(byte_llama, **over, **{"train.steps": 3}), root, one_device())
  return root, export_prompt(root / "full", "peft", root / "exports")


def test_one_run_trains_the_shared_prompt_and_each_task_s_factor_and_resumes_exactly(byte_llama, mixture):
  root, _ = mixture
  a, b = (Checkpointer.reader(root / w / "checkpoints").restore_prompt(6)[0]["prompt"] for w in ("full", "split"))
  assert {k: np.shape(v) for k, v in a.items()} == {"shared": (P, 32), "task_cols": (2, P, R), "task_rows": (2, R, 32)}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  run, _ = build_run(tiny_cfg(byte_llama, **MIX), mesh=one_device(), with_train_data=False)
  start = run.prompt["prompt"]
  assert not np.allclose(a["shared"], start["shared"])
  for k in range(2):  # both tasks' factors trained (each task's rows reach only its own factor)
    assert not np.allclose(a["task_cols"][k], start["task_cols"][k])
    assert not np.allclose(a["task_rows"][k], start["task_rows"][k])
  assert float(np.std(start["task_cols"])) == pytest.approx(0.02, rel=0.3)  # PEFT's N(0, 0.02)


def test_optimizer_state_is_the_trainable_leaves_only_and_the_base_does_not_move(byte_llama):
  from jaxprompt.data.pipeline import BatchStream
  from jaxprompt.training.step import make_train_step

  cfg = tiny_cfg(byte_llama, **MIX, **{"optimizer.name": "adam", "model.dropout": 0.0})
  run, data = build_run(cfg, mesh=one_device())
  tx = build_optimizer(cfg.optimizer, cfg.train.steps, {})
  opt = tx.init(run.prompt)
  shapes = {x.shape for x in jax.tree.leaves(run.prompt)}
  assert all(x.shape in shapes or x.size <= 1 for x in jax.tree.leaves(opt))
  assert sum(x.size for x in jax.tree.leaves(opt) if x.shape in shapes) == 2 * sum(
    x.size for x in jax.tree.leaves(run.prompt)
  )
  frozen_before = jax.tree.map(np.asarray, run.frozen)
  rows = [
    run.encode(d.examples, m.name).with_task_ids(k) for k, (m, d) in enumerate(zip(run.members, data, strict=True))
  ]
  from jaxprompt.batches import concat_rows

  batch = run.device_batch(next(BatchStream(concat_rows(rows), 8, seed=1)))
  assert len(set(np.asarray(batch.task_ids).tolist())) == 2  # a mixed batch
  step = jax.jit(make_train_step(run.graphdef, tx, z_loss=0.0, microbatches=1))
  prompt, _, _ = step(run.prompt, opt, run.frozen, batch, jnp.asarray(0))
  assert not np.allclose(prompt["prompt"]["shared"], run.prompt["prompt"]["shared"])
  for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.tree.map(np.asarray, run.frozen)), strict=True):
    np.testing.assert_array_equal(x, y)


def test_exports_give_peft_our_logits_and_generations_and_score_what_the_mixture_reported(byte_llama, mixture):
  root, out = mixture
  assert sorted(p.name for p in out.iterdir()) == ["bank", "bank.safetensors", "quickstart_max", "quickstart_min"]
  acfg = json.loads((out / "bank" / "adapter_config.json").read_text())
  assert (acfg["peft_type"], acfg["num_tasks"], acfg["num_ranks"], acfg["num_virtual_tokens"]) == (
    "MULTITASK_PROMPT_TUNING",
    2,
    R,
    P,
  )
  assert json.loads((out / "quickstart_min" / "adapter_config.json").read_text())["num_tasks"] == 1
  params = Checkpointer.reader(root / "full" / "checkpoints").restore_prompt(6)[0]
  run, _ = build_run(tiny_cfg(byte_llama, **MIX), mesh=one_device(), with_train_data=False)
  trained = nnx.merge(run.graphdef, jax.tree.map(jnp.asarray, params), run.frozen)  # the training module itself
  tok = run.tokenizer
  peft_bank = _peft(byte_llama, out / "bank")
  tasks = np.array([1, 0, 1])
  for ids, mask in _layouts(run.base, tok):
    ours = np.asarray(trained.full_logits(jnp.asarray(ids), jnp.asarray(mask), prompt_ids=jnp.asarray(tasks)))
    np.testing.assert_allclose(_peft_logits(peft_bank, ids, mask, tasks), ours, atol=TOL, rtol=TOL)
    for k, slug in enumerate(("quickstart_max", "quickstart_min")):  # each task's own adapter: task id 0
      one = _peft(byte_llama, out / slug)
      want = np.asarray(trained.full_logits(jnp.asarray(ids), jnp.asarray(mask), prompt_ids=jnp.full(3, k)))
      np.testing.assert_allclose(_peft_logits(one, ids, mask, np.zeros(3, int)), want, atol=TOL, rtol=TOL)
  # greedy generations: PEFT (each row alone, no cache: see test_export_peft) against jaxprompt's mixed batch
  eos = tok.eos_token_id
  tps = [load_prompt_source(out / slug) for slug in ("quickstart_max", "quickstart_min")]
  ours = inference.generate_text(run.base, tok, TEXTS, tps, max_new_tokens=6)
  left_ids, left_mask = encoding.encode_inputs(run.base.batch_type, tok, TEXTS)
  for k in range(2):
    for i in range(len(TEXTS)):
      ids = left_ids[i : i + 1, left_mask[i] == 1]
      with torch.no_grad():
        seq = peft_bank.generate(
          input_ids=_t(ids), task_ids=_t([k]), max_new_tokens=6, do_sample=False, use_cache=False
        ).numpy()[0, ids.shape[1] :]
      new = list(map(int, seq))
      new = new[: new.index(eos) + 1] if eos in new else new
      assert ours[k * len(TEXTS) + i]["tokens"] == new
  # each task's exported prompt, alone in a single-task evaluation, scores what the mixture's evaluation reported
  evals = [json.loads(line) for line in (root / "full" / "metrics.jsonl").read_text().splitlines()]
  last = next(e for e in reversed(evals) if e["kind"] == "eval")
  for task, slug in ((MAX, "quickstart_max"), (MIN, "quickstart_min")):
    tp = load_prompt_source(out / slug)
    assert tp.spec == MultitaskSpec(rank=R) and tp.record.task.name == task
    cfg = tiny_cfg(byte_llama, **{"data.task": task, "prompt.length": P, "eval.max_examples": 24})
    single, _ = build_run(cfg, mesh=one_device(), with_train_data=False)
    product = fixed(tp.value, tp.spec).embeddings[...]
    np.testing.assert_array_equal(tp.embeddings("x"), product)  # what inspect / similarity read: the product
    metrics, _ = evaluator_for(single)({"prompt": {"embeddings": product}})
    assert metrics["accuracy"] == last[f"{task}/accuracy"], (task, metrics, last)


def test_a_target_starts_from_the_source_as_peft_does(byte_llama, mixture):
  """PEFT's AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK / ONLY_SOURCE_SHARED from the source's state dict (our
  exported adapter of both tasks) against ours from the source workdir."""
  from peft import MultitaskPromptTuningConfig, TaskType, get_peft_model
  from transformers import AutoModelForCausalLM

  root, out = mixture
  src = root / "full"
  for init, task in (("average_source_tasks", None), ("exact_source_task", MIN), ("only_source_shared", None)):
    over = {**MPT, "prompt.multitask_source": str(src), "prompt.multitask_init": init}
    if task:
      over["prompt.multitask_source_task"] = task
    run, _ = build_run(tiny_cfg(byte_llama, **over), mesh=one_device(), with_train_data=False)
    ours = run.prompt["prompt"]
    cfg = MultitaskPromptTuningConfig(
      task_type=TaskType.CAUSAL_LM,
      num_virtual_tokens=P,
      num_ranks=R,
      num_tasks=1,
      prompt_tuning_init=init.upper(),
      prompt_tuning_init_state_dict_path=str(out / "bank" / "adapter_model.safetensors"),
      prompt_tuning_init_task=1,
    )
    enc = get_peft_model(AutoModelForCausalLM.from_pretrained(byte_llama), cfg).prompt_encoder["default"]
    np.testing.assert_array_equal(np.asarray(ours["shared"]), enc.embedding.weight.detach().numpy())
    if init != "only_source_shared":  # (PEFT keeps its fresh random factors; ours are fresh too)
      np.testing.assert_allclose(np.asarray(ours["task_cols"]), enc.prefix_task_cols.detach().numpy(), rtol=1e-6)
      np.testing.assert_allclose(np.asarray(ours["task_rows"]), enc.prefix_task_rows.detach().numpy(), rtol=1e-6)
  bad = {**MPT, "prompt.multitask_source": str(src), "prompt.multitask_init": "exact_source_task"}
  with pytest.raises(PromptError, match="needs prompt.multitask_source_task"):
    build_run(tiny_cfg(byte_llama, **bad), mesh=one_device(), with_train_data=False)
  with pytest.raises(
    C.ConfigError, match="prompt.multitask_init applies to multitask with prompt.multitask_source set"
  ):
    C.from_dict({"prompt": {"method": "multitask", "multitask_init": "exact_source_task"}})


def test_a_t5_multitask_prompt_runs_here_and_its_peft_export_is_refused_in_one_line(byte_t5, tmp_path, capsys):
  """PEFT's MPT forward fails on seq2seq models; here a T5 multitask prompt is its product before the encoder."""
  from jaxprompt.models.hf import Architecture, save_safetensors
  from jaxprompt.prompts.multitask import pack
  from jaxprompt.prompts.record import PromptRecord

  rng = np.random.default_rng(3)
  shared, cols, rows = rng.normal(size=(P, 32)), rng.normal(size=(P, R)), rng.normal(size=(R, 32))
  value = pack(shared, cols, rows).astype(np.float32)
  record = PromptRecord(spec=MultitaskSpec(rank=R), architecture=Architecture(kind="seq2seq", hidden_size=32))
  save_safetensors(
    {"prompt_embeddings": value}, tmp_path / "p.safetensors", metadata={"jaxprompt": json.dumps(record.to_json())}
  )
  with pytest.raises(ExportError, match="PEFT's MULTITASK_PROMPT_TUNING forward fails on seq2seq"):
    export_prompt(tmp_path / "p.safetensors", "peft", tmp_path / "adapter")
  capsys.readouterr()
  code = main(["export", str(tmp_path / "p.safetensors"), "--format", "peft", "--out", str(tmp_path / "adapter")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "forward fails on seq2seq" in err[0]
  ids, mask = jnp.asarray([[5, 6, 7, 1], [8, 9, 1, 0]]), jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]])
  dec = jnp.asarray([[0, 5], [0, 6]])
  product = (shared * (cols @ rows)).astype(np.float32)
  np.save(tmp_path / "product.npy", product)
  np.testing.assert_allclose(
    np.asarray(load_prompted(byte_t5, tmp_path / "p.safetensors")(ids, mask, dec)),
    np.asarray(load_prompted(byte_t5, tmp_path / "product.npy")(ids, mask, dec)),
    atol=1e-5,
    rtol=0,
  )
