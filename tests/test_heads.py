"""Classification heads (`head.type` sequence / token) end to end: entity metrics against seqeval itself, the CoNLL
reader and WNUT-17, first-sub-token labels, config errors, and training with a head on a random tiny Llama (GQA)
with TinyStories-656K's real tokenizer — the head trained with the prompt (optimizer state, frozen base bitwise
unchanged), exact resume, and exports that PEFT loads with our logits (1e-4)."""

import json
import random
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprompt import config as C
from jaxprompt import load_prompted
from jaxprompt import metrics as M
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.data import encoding, readers
from jaxprompt.data.sources import load_split
from jaxprompt.data.tasks import WNUT17_TAGS
from jaxprompt.errors import ConfigError, DataError, ExportError
from jaxprompt.models.loading import load_tokenizer
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.step import make_train_step
from jaxprompt.training.trainer import train
from tests.helpers import one_device, train_interrupted
from tests.helpers_hf import write_decoder, write_encoder

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened

# -- entity metrics against seqeval -------------------------------------------------------------------------------


def test_entity_metrics_match_seqeval_on_random_and_tricky_tags():
  from seqeval.metrics import f1_score, precision_score, recall_score

  tricky = [
    ([["I-PER", "I-PER", "O"]], {("PER", 0, 1)}),  # I- after O starts an entity
    ([["B-PER", "I-LOC", "I-LOC"]], {("PER", 0, 0), ("LOC", 1, 2)}),  # a type change ends one, starts another
    ([["O", "I-LOC", "B-LOC", "I-LOC"]], {("LOC", 1, 1), ("LOC", 2, 3)}),  # B- ends the entity before it
    ([["B-PER"], ["I-PER"]], {("PER", 0, 0), ("PER", 2, 2)}),  # never across sentences
    ([["B-creative-work", "I-creative-work"]], {("creative-work", 0, 1)}),  # types with dashes
    ([["S-X", "E-X", "B-Y", "E-Y"]], {("X", 0, 0), ("X", 1, 1), ("Y", 2, 3)}),  # IOBES as seqeval reads it
  ]
  for sentences, want in tricky:
    assert M.entities(sentences) == want
  rng = random.Random(0)
  tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "E-PER", "S-LOC", "B-creative-work", "I-creative-work"]
  cases = [(s, s) for s, _ in tricky] + [(s, [["O"] * len(x) for x in s]) for s, _ in tricky]
  for _ in range(400):
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 8))] for _ in range(rng.randint(1, 5))]
    cases.append((gold, [[rng.choice(tags) for _ in s] for s in gold]))
  for gold, pred in cases:
    ours = M.entity_metrics(gold, pred)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # seqeval warns where a score is undefined (then 0, as ours)
      ref = (precision_score(gold, pred), recall_score(gold, pred), f1_score(gold, pred))
    assert (ours["entity_precision"], ours["entity_recall"], ours["entity_f1"]) == pytest.approx(ref, abs=1e-12)


# -- data ----------------------------------------------------------------------------------------------------------


def test_conll_reader_ends_sentences_at_whitespace_only_lines(tmp_path):
  f = tmp_path / "a.conll"
  f.write_text("Hi\tO\nBob\tB-person\n\t\nin\tO\r\nParis\tB-location\n   \n\nok\tO\n", encoding="utf-8")
  rows = readers.read_rows(f)
  assert [r["tokens"] for _, r in rows] == [["Hi", "Bob"], ["in", "Paris"], ["ok"]]
  assert rows[1][1]["ner_tags"] == ["O", "B-location"] and rows[1][0] == f"{f} line 4"
  ex = load_split("wnut17", "train", files={"train": f})
  assert ex[0]["words"] == ["Hi", "Bob"] and ex[0]["tags"] == [0, 9] and ex[0]["targets"] == "O B-person"
  f.write_text("Hi\tO\nBob\tB-nobody\n")
  with pytest.raises(DataError, match=r"a.conll line 1: field 'ner_tags': unknown tags \['B-nobody'\]"):
    load_split("wnut17", "train", files={"train": f})
  f.write_text("Hi\tO\nBob\n")
  with pytest.raises(DataError, match=r"a.conll line 2: expected 'token TAB tag', got 'Bob'"):
    readers.read_rows(f)


def test_wnut17_fixture_splits(fixtures_dir):
  d = fixtures_dir / "data" / "wnut17"
  files = {
    "train": d / "wnut17train.conll",
    "validation": d / "emerging.dev.conll",
    "test": d / "emerging.test.annotated",
  }
  sizes = {s: load_split("wnut17", s, files=files) for s in files}
  assert {s: len(e) for s, e in sizes.items()} == {"train": 3394, "validation": 1009, "test": 1287}
  assert sum(len(e["words"]) for e in sizes["train"]) == 62730
  types = {"person", "location", "group", "creative-work", "corporation", "product"}
  assert len(WNUT17_TAGS) == 13 and {t.split("-", 1)[-1] for t in WNUT17_TAGS[1:]} == types
  assert {t for e in sizes["train"] for t in e["targets"].split()} == set(WNUT17_TAGS)


@pytest.fixture(scope="module")
def tok_llama(tmp_path_factory, fixtures_dir):
  """A random tiny Llama (GQA) over TinyStories-656K's 2048-token vocabulary, with that real tokenizer beside it."""
  src = fixtures_dir / "models" / "tinystories-656k"
  folder = write_decoder(
    tmp_path_factory.mktemp("tok_llama") / "m",
    "llama3-gqa-untied",
    seed=51,
    vocab_size=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src / name, folder / name)
  return folder


def test_token_labels_go_to_each_words_first_sub_token(tok_llama):
  tok = load_tokenizer(tok_llama)
  words = ["@paulwalk", "saw", "Empire", "State"]
  rows = encoding.encode_token_labels([{"words": words, "tags": [0, 7, 7, 8]}], tok, input_length=24)
  ids, word_of = encoding.word_rows(tok, [words])[0]
  n = len(ids)
  assert np.asarray(rows.input_ids)[0, :n].tolist() == ids and rows.input_mask[0].sum() == n
  first = [j for j, w in enumerate(word_of) if w is not None and (j == 0 or word_of[j - 1] != w)]
  assert len(first) == 4 and word_of[0] is None  # BOS carries no label
  assert np.flatnonzero(rows.label_mask[0]).tolist() == first
  assert rows.labels[0, first].tolist() == [0, 7, 7, 8]
  assert len(tok(["@paulwalk"], add_special_tokens=False)["input_ids"][0]) > 1  # a word of several sub-tokens
  last = encoding.encode_token_labels([{"words": words, "tags": [0, 7, 7, 8]}], tok, input_length=24, word_token="last")
  ends = [j for j, w in enumerate(word_of) if w is not None and (j + 1 == n or word_of[j + 1] != w)]
  assert ends != first and np.flatnonzero(last.label_mask[0]).tolist() == ends
  assert last.labels[0, ends].tolist() == [0, 7, 7, 8]
  cut = encoding.encode_token_labels([{"words": words, "tags": [0, 7, 7, 8]}], tok, input_length=first[2] + 1)
  assert cut.label_mask[0].sum() == 3  # the last word is cut off (evaluation predicts "O" for it)


def test_head_config_errors(tok_llama, tmp_path):
  f = tmp_path / "a.conll"
  f.write_text("Hi\tO\n")

  def run(**over):
    raw = {"model": {"path": str(tok_llama)}, "train": {"batch_size": 2}, "eval": {"metric": "eval_loss"}}
    for k, v in over.items():
      sec, key = k.split(".")
      raw.setdefault(sec, {})[key] = v
    return build_run(C.from_dict(raw), mesh=one_device(), with_train_data=False)

  wnut = {"data.task": "wnut17", "data.files": {"train": str(f), "validation": str(f)}}
  with pytest.raises(ConfigError, match="^task wnut17 labels every word: it needs head.type token$"):
    run(**wnut)
  with pytest.raises(ConfigError, match=r"head.type sequence does not fit task wnut17 \(a label per word\): use head"):
    run(**wnut, **{"head.type": "sequence"})
  with pytest.raises(ConfigError, match=r"head.type token does not fit task glue/sst2 \(a label per example\)"):
    run(**{"data.task": "sst2", "head.type": "token"})
  with pytest.raises(ConfigError, match="head.dropout must be in"):
    C.from_dict({"head": {"dropout": 1.5}})
  with pytest.raises(ConfigError, match="eval.metric 'accuracy' is not computed for task wnut17"):
    run(**wnut, **{"head.type": "token", "eval.metric": "accuracy"})


# -- training with a head --------------------------------------------------------------------------------------------


def _sst2_files(tmp_path, fixtures_dir, n=24):
  lines = (fixtures_dir / "data" / "sst2" / "train.txt").read_text().splitlines()
  (tmp_path / "t.txt").write_text("\n".join(lines[:n]) + "\n")
  (tmp_path / "v.txt").write_text("\n".join(lines[n : n + 12]) + "\n")
  return {"train": str(tmp_path / "t.txt"), "validation": str(tmp_path / "v.txt")}


def _cfg(folder, files, **over) -> C.Config:
  raw = {
    "model": {"path": str(folder)},
    "prompt": {"length": 3, "init": "random_uniform"},
    "head": {"type": "sequence"},
    "data": {"task": "sst2", "files": files, "input_length": 24, "length_buckets": "none"},
    "optimizer": {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 0.0},
    "train": {"steps": 4, "batch_size": 4, "log_every": 2, "plot": False, "z_loss": 0.0},
    "eval": {"every": 0, "at_end": True, "batch_size": 6, "metric": "accuracy"},
    "checkpoint": {"every": 2, "keep": 5, "async_save": False},
  }
  for k, v in over.items():
    sec, key = k.split(".")
    raw.setdefault(sec, {})[key] = v
  return C.from_dict(raw)


def _hf_cls(per_token):
  import transformers

  return transformers.LlamaForTokenClassification if per_token else transformers.LlamaForSequenceClassification


def test_sequence_head_trains_with_the_prompt_resumes_exactly_and_loads_in_peft(tok_llama, fixtures_dir, tmp_path):
  from peft import PeftModel

  files, mesh = _sst2_files(tmp_path, fixtures_dir), one_device()
  train_interrupted(_cfg(tok_llama, files), _cfg(tok_llama, files, **{"train.steps": 2}), tmp_path, mesh)
  full, split = (Checkpointer.reader(tmp_path / w / "checkpoints").restore_prompt(4) for w in ("full", "split"))
  assert set(full[0]) == {"prompt", "head"} and full[0]["head"]["out"].shape == (32, 2)
  for x, y in zip(jax.tree.leaves(full[0]), jax.tree.leaves(split[0]), strict=True):
    np.testing.assert_array_equal(x, y)
  assert full[1]["head"]["type"] == "sequence" and full[1]["head"]["labels"] == ["negative", "positive"]
  summary = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert {"accuracy", "macro_f1", "matthews"} <= set(next(r for r in summary if r["kind"] == "eval"))

  out = export_prompt(tmp_path / "full", "peft", tmp_path / "peft", step=4)
  adapter = json.loads((out / "adapter_config.json").read_text())
  assert (adapter["task_type"], adapter["modules_to_save"]) == ("SEQ_CLS", ["score"])
  ids = np.array([[0, 0, 1, 80, 1288, 139], [1, 80, 34, 72, 249, 57]])  # left-padded: PEFT reads the last slot
  mask = (ids != 0).astype(np.int32)
  ours = np.asarray(load_prompted(str(tok_llama), tmp_path / "full", step=4)(ids, mask))
  hf = _hf_cls(False).from_pretrained(tok_llama, num_labels=2, pad_token_id=0).eval()
  pm = PeftModel.from_pretrained(hf, out).eval()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
  again = np.asarray(load_prompted(str(tok_llama), out)(ids, mask))  # our import of our export
  np.testing.assert_allclose(again, ours, atol=1e-6, rtol=0)


def _wnut_files(tmp_path, fixtures_dir, n=16):
  text = (fixtures_dir / "data" / "wnut17" / "wnut17train.conll").read_text()
  sentences = [s for s in text.replace("\n\t\n", "\n\n").split("\n\n") if s.strip()]
  (tmp_path / "t.conll").write_text("\n\n".join(sentences[:n]) + "\n")
  (tmp_path / "v.conll").write_text("\n\n".join(sentences[n : n + 8]) + "\n")
  return {"train": str(tmp_path / "t.conll"), "validation": str(tmp_path / "v.conll")}


def test_token_head_trains_with_a_deep_prompt_base_unchanged_and_exports(tok_llama, fixtures_dir, tmp_path):
  from peft import PeftModel

  files = _wnut_files(tmp_path, fixtures_dir)
  over = {
    "head.type": "token",
    "data.task": "wnut17",
    "data.input_length": 48,
    "prompt.method": "prefix_tuning",
    "prompt.prefix_projection": True,
    "prompt.encoder_hidden_size": 16,
    "eval.metric": "entity_f1",
    "train.steps": 2,
  }
  cfg = _cfg(tok_llama, files, **over)
  run, data = build_run(cfg, mesh=one_device())
  tx = build_optimizer(cfg.optimizer, 2)
  state = (run.prompt, tx.init(run.prompt))
  assert state[1][0].mu["head"]["out"].shape == (32, 13)  # the head has optimizer state
  frozen = jax.tree.map(np.array, run.frozen)
  step = jax.jit(make_train_step(run.graphdef, tx, z_loss=0.0))
  batch = run.encode(data[0].examples[:4], "t")
  prompt, opt = state
  for s in range(2):
    prompt, opt, metrics = step(prompt, opt, run.frozen, jax.tree.map(jnp.asarray, batch), jnp.asarray(s))
  assert float(metrics["finite"]) == 1.0
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(run.frozen), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))  # the base, bitwise
  assert not np.array_equal(prompt["head"]["out"], run.prompt["head"]["out"])  # the head trained

  train(cfg, tmp_path / "w", progress=False, mesh=one_device())
  summary = [json.loads(r) for r in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert set(M.ENTITY) <= set(next(r for r in summary if r["kind"] == "eval"))
  with pytest.raises(ExportError, match="a .npy holds the prompt alone; this prompt has a token head"):
    export_prompt(tmp_path / "w", "numpy", tmp_path / "p.npy")
  out = export_prompt(tmp_path / "w", "peft", tmp_path / "peft")
  st = export_prompt(tmp_path / "w", "safetensors", tmp_path / "p.safetensors")
  assert load_prompt_source(st).record.head.type == "token"
  ids = np.array([[1, 80, 1288, 139, 249, 57, 0, 0], [1, 80, 34, 72, 80, 7, 71, 80]])  # right-padded
  mask = (ids != 0).astype(np.int32)
  ours = np.asarray(load_prompted(str(tok_llama), tmp_path / "w")(ids, mask))
  np.testing.assert_allclose(np.asarray(load_prompted(str(tok_llama), st)(ids, mask)), ours, atol=1e-6, rtol=0)
  pm = PeftModel.from_pretrained(_hf_cls(True).from_pretrained(tok_llama, num_labels=13).eval(), out).eval()
  full = torch.cat([torch.ones(2, 3, dtype=torch.long), torch.tensor(mask, dtype=torch.long)], 1)
  with torch.no_grad():  # PEFT's prefix as transformers' cache (PEFT's own forward fails: see test_heads_peft)
    ref = pm.base_model(input_ids=torch.tensor(ids), attention_mask=full, cache=pm.get_prompt(2)).logits.numpy()
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "deberta"])
def test_an_encoder_trains_a_sequence_head_and_peft_loads_it(fixtures_dir, tmp_path, family):
  """BERT (the third model kind, no language-model head) with BertForSequenceClassification's head on the pooled
  output, and DeBERTa-v2 with DebertaV2ForSequenceClassification's (its ContextPooler, then `classifier`), trained
  with a prompt, exported; PEFT gives our logits."""
  import transformers
  from peft import PeftModel

  variant, cls = {"bert": ("bert", "Bert"), "deberta": ("deberta-v2-seqcls", "DebertaV2")}[family]
  folder = write_encoder(tmp_path / family, variant, seed=52, vocab_size=30522)
  vocab = fixtures_dir / "tokenizers" / "bert-uncased"
  shutil.copy(vocab / "vocab.txt", tmp_path / "vocab.txt")  # a bare WordPiece folder (DeBERTa's is SentencePiece)
  cfg = _cfg(folder, _sst2_files(tmp_path, fixtures_dir, n=8), **{"train.steps": 2, "model.tokenizer": str(vocab)})
  train(cfg, tmp_path / "w", progress=False, mesh=one_device())
  out = export_prompt(tmp_path / "w", "peft", tmp_path / "peft")
  assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
  ids = np.array([[101, 2023, 2003, 102, 0], [101, 2307, 3185, 2003, 102]])
  mask = (ids != 0).astype(np.int32)
  ours = np.asarray(load_prompted(str(folder), tmp_path / "w")(ids, mask))
  hf_model = getattr(transformers, f"{cls}ForSequenceClassification").from_pretrained(folder, num_labels=2).eval()
  pm = PeftModel.from_pretrained(hf_model, out)
  with torch.no_grad():
    ref = pm.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
