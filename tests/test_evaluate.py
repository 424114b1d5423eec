"""Evaluation: rank classification equals an explicit per-label log-likelihood; generation-based evaluation
post-processes unknown strings to -1 (counted wrong); a custom TSV task trains end to end with periodic
evaluation, predictions and the best checkpoint kept."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import config as C
from jaxprompt import prompts as P
from jaxprompt import sharding as shd
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.data import encoding
from jaxprompt.evaluation.evaluator import evaluator_for
from jaxprompt.models import load_model
from jaxprompt.models.t5 import shift_right
from jaxprompt.run import build_run
from jaxprompt.training.trainer import train
from tests.helpers import small_cfg
from tests.helpers_hf import write_decoder


def _one_device():
  return shd.make_mesh(devices=jax.devices()[:1])


def _explicit_logp(model, ids, mask, label_ids, label_mask):
  """log p(label | prompt, input) for one example and one label, by a plain forward pass of the sequence."""
  if model.kind == "seq2seq":
    logits = model(ids[None], mask[None], shift_right(label_ids[None], model.base.config.decoder_start_token_id))[0]
    logp = jax.nn.log_softmax(logits, -1)
    return float(sum(logp[t, label_ids[t]] for t in range(len(label_ids)) if label_mask[t]))
  real = ids[mask.astype(bool)]  # the input without its padding, then the label
  lab = label_ids[label_mask.astype(bool)]
  seq = jnp.concatenate([real, lab])[None]
  logits = model.full_logits(seq, jnp.ones_like(seq))[0]  # [P + len, V]
  logp = jax.nn.log_softmax(logits, -1)
  start = model.prompt.length + len(real)
  return float(sum(logp[start - 1 + t, lab[t]] for t in range(len(lab))))


@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_rank_classification_equals_explicit_log_likelihoods(byte_t5, tmp_path, kind):
  from transformers import ByT5Tokenizer

  tok = ByT5Tokenizer()
  if kind == "seq2seq":
    base = load_model(byte_t5)
  else:
    base = load_model(write_decoder(tmp_path / "llama", "llama3-gqa-untied", vocab_size=384))
  model = P.PromptedModel(base, P.SoftPrompt(jax.random.normal(jax.random.key(0), (3, base.hidden_size))))
  labels = ["yes", "no", "maybe"]
  lab_ids, lab_mask = encoding.encode_labels(base.batch_type, tok, labels, target_length=6)
  batch = encoding.encode(
    base.batch_type,
    [{"inputs": "is it?", "targets": "yes"}, {"inputs": "a longer question here", "targets": "no"}],
    tok,
    input_length=24,
    target_length=6,
  )
  batch = jax.tree.map(jnp.asarray, batch)
  got = np.asarray(model.label_logprobs(batch, jnp.asarray(lab_ids), jnp.asarray(lab_mask)))
  for b in range(2):
    for c in range(3):
      want = _explicit_logp(
        model, batch.input_ids[b], batch.input_mask[b], jnp.asarray(lab_ids[c]), jnp.asarray(lab_mask[c])
      )
      np.testing.assert_allclose(got[b, c], want, rtol=1e-5, atol=1e-4)


def test_generation_eval_counts_unknown_strings_as_wrong(byte_t5):
  cfg = small_cfg(byte_t5, **{"eval.mode": "generate", "eval.max_examples": 12})
  run, _ = build_run(cfg, mesh=_one_device(), with_train_data=False)
  ev = evaluator_for(run)
  metrics, records = ev(run.prompt)
  # a random model emits no label string: every prediction is class -1, wrong, in the <invalid> column
  invalid = sum(row[-1] for row in ev.confusion)
  valid_hits = sum(r["correct"] for r in records)
  assert len(records) == 12 and all(isinstance(r["prediction"], str) for r in records)
  assert metrics["accuracy"] == valid_hits / 12
  assert invalid + sum(sum(row[:-1]) for row in ev.confusion) == 12
  assert invalid > 0 and valid_hits == sum(ev.confusion[i][i] for i in range(10))


def test_eval_batch_is_rounded_to_the_mesh_and_gives_the_single_device_result(byte_t5):
  cfg = small_cfg(byte_t5, **{"eval.max_examples": 12, "eval.batch_size": 10})
  one, _ = build_run(cfg, mesh=_one_device(), with_train_data=False)
  eight, _ = build_run(cfg, mesh=shd.make_mesh(data=4, fsdp=2), with_train_data=False)
  ev1, ev8 = evaluator_for(one), evaluator_for(eight)
  assert (ev1.batch_size, ev8.batch_size) == (10, 16)  # 10 rows do not split over data x fsdp = 8
  m1, r1 = ev1(one.prompt)
  m8, r8 = ev8(eight.prompt)
  assert [r["prediction"] for r in r1] == [r["prediction"] for r in r8] and len(r8) == 12
  assert m1["accuracy"] == m8["accuracy"]
  np.testing.assert_allclose(m1["eval_loss"], m8["eval_loss"], rtol=1e-5)


def test_custom_tsv_task_end_to_end(byte_t5, tmp_path, fixtures_dir):
  lines = (fixtures_dir / "data/sst2/train.txt").read_text().splitlines()[:80]
  for split, rows in (("train", lines[:60]), ("validation", lines[60:])):
    with open(tmp_path / f"{split}.tsv", "w") as f:
      f.write("sentence\ty\n")
      for line in rows:
        label, text = line.split(" ", 1)
        f.write(f"{text.replace(chr(9), ' ')}\t{label}\n")
  raw = small_cfg(byte_t5).to_dict()
  raw["data"].update(
    task="sentiment",
    taskless=False,
    input_length=48,
    target_length=9,  # "negative" + EOS, whole: classification labels are never cut
    files={"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "validation.tsv")},
    custom={
      "columns": {"text": "sentence"},
      "template": "sentiment: {text}",
      "labels": ["negative", "positive"],
      "label_column": "y",
      "metrics": ["accuracy", "f1", "matthews"],
    },
  )
  raw["prompt"].update(init="class_labels")
  raw["train"].update(steps=6)
  raw["eval"].update(every=2, max_examples=None, batch_size=10)
  raw["checkpoint"].update(every=2, keep=1)
  cfg = C.from_dict(raw)
  summary = train(cfg, tmp_path / "run", progress=False, mesh=_one_device())
  evals = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
  ]
  assert [e["step"] for e in evals] == [2, 4, 6]
  assert {"accuracy", "f1", "matthews", "eval_loss"} <= set(evals[0])
  preds = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "step_6.jsonl").read_text().splitlines()]
  assert len(preds) == 20 and preds[0]["inputs"].startswith("sentiment: ")
  assert {p["prediction"] for p in preds} <= {"negative", "positive"}
  conf = json.loads((tmp_path / "run" / "predictions" / "confusion_step_6.json").read_text())
  assert sum(map(sum, conf["counts"])) == 20 and conf["columns"][-1] == "<invalid>"
  kept = Checkpointer(tmp_path / "run" / "checkpoints").steps()
  assert summary.best_step in kept and 6 in kept
  best = max(evals, key=lambda e: (e["accuracy"], -e["step"]))
  assert summary.best_step == best["step"]


def test_preview_prints_what_the_model_is_fed(capsys, fixtures_dir):
  from jaxprompt.cli import main

  cb = fixtures_dir / "data/superglue/cb/val.jsonl"
  assert (
    main(
      [
        "preview",
        "configs/paper/t5-small-lm-adapt.yaml",
        "--set",
        "data.task=cb",
        "--set",
        f"data.files.validation={cb}",
        "--split",
        "validation",
        "--n",
        "2",
      ]
    )
    == 0
  )
  out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  first = json.loads(cb.read_text().splitlines()[0])
  assert out[0] == {
    "inputs": f"cb hypothesis: {first['hypothesis']} premise: {first['premise']}",
    "targets": first["label"],
  }
  assert len(out) == 2
