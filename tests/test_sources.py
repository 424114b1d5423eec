"""Data sources: local files in every format, the original SuperGLUE layouts, HF `datasets`, and TFDS
(mocked with tfds.testing.mock_data) all give the same examples for the same rows."""

import csv
import json
import sys
import time
import types

import numpy as np
import pytest

from jaxprompt import config as C
from jaxprompt.data import sources
from jaxprompt.data.sources import load_split
from jaxprompt.data.tasks import custom_task, get_task
from jaxprompt.errors import DataError


def _cb_rows(fixtures_dir, n=None):
  lines = (fixtures_dir / "data/superglue/cb/val.jsonl").read_text(encoding="utf-8").splitlines()
  return [json.loads(line) for line in lines[:n]]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


def _write_table(path, rows, tabs):
  with path.open("w", encoding="utf-8", newline="") as f:
    if tabs:  # GLUE-style TSV: no quoting at all
      keys = list(rows[0])
      f.write("\t".join(keys) + "\n")
      for r in rows:
        f.write("\t".join(str(r[k]) for k in keys) + "\n")
    else:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  return path


def test_file_formats_agree(fixtures_dir, tmp_path):
  rows = _cb_rows(fixtures_dir, 8)
  rows[0] = dict(rows[0], premise='He said "no, never" and left.\u00a0Then, "yes".')  # quotes, comma, unicode
  want = load_split("cb", "validation", files={"validation": _write_jsonl(tmp_path / "v.jsonl", rows)})
  assert want[0]["inputs"] == (
    'cb hypothesis: Valence was helping premise: He said "no, never" and left.\u00a0Then, "yes".'
  )
  (tmp_path / "v.json").write_text(json.dumps(rows), encoding="utf-8")
  files = {
    "json": tmp_path / "v.json",
    "csv": _write_table(tmp_path / "v.csv", rows, tabs=False),
    "tsv": _write_table(tmp_path / "v.tsv", rows, tabs=True),
  }
  for split, path in files.items():
    assert load_split("cb", split, files={split: path}) == want, path.suffix
  int_labels = [dict(r, label=["entailment", "contradiction", "neutral"].index(r["label"])) for r in rows]
  assert load_split("cb", "v", files={"v": _write_jsonl(tmp_path / "i.jsonl", int_labels)}) == want


def test_order_is_deterministic(fixtures_dir):
  files = {"train": fixtures_dir / "data/superglue/rte/train.jsonl"}
  a, b = load_split("rte", "train", files=files), load_split("rte", "train", files=files)
  assert a == b and len(a) == 2490
  first = json.loads((fixtures_dir / "data/superglue/rte/train.jsonl").open().readline())
  assert a[0]["inputs"] == f"rte hypothesis: {first['hypothesis']} premise: {first['premise']}"


def test_sst2_text_file_builtin_and_custom(fixtures_dir):
  files = {"validation": fixtures_dir / "data/sst2/dev.txt", "train": fixtures_dir / "data/sst2/train.txt"}
  ex = load_split("sst2", "validation", files=files)
  assert len(ex) == 872 and len(load_split("sst2", "train", files=files)) == 6920
  first = {"sentence": "one long string of cliches ."}
  assert ex[0] == {
    "inputs": "sst2 sentence: one long string of cliches .",
    "targets": "negative",
    "label": 0,
    "fields": first,
  }
  assert ex[1]["inputs"] == (
    "sst2 sentence: if you 've ever entertained the notion of doing what the title of this "
    "film implies , what sex with strangers actually shows may put you off the idea forever ."
  )
  assert sum(e["label"] for e in ex) == 444  # positives in the SST-2 dev set
  tl = load_split(get_task("sst2", taskless=True), "validation", files=files)
  assert tl[0]["inputs"] == "sentence: one long string of cliches ."
  mine = custom_task("sst2-custom", template="review: {text}", labels=["negative", "positive"])
  cex = load_split(mine, "validation", files=files)
  text = {"text": "one long string of cliches ."}
  assert cex[0] == {"inputs": "review: one long string of cliches .", "targets": "negative", "label": 0, "fields": text}
  assert [e["label"] for e in cex] == [e["label"] for e in ex]


COARSE = {
  "ABBR": "abbreviation",
  "DESC": "description",
  "ENTY": "entity",
  "HUM": "human",
  "LOC": "location",
  "NUM": "number",
}


def test_trec_custom_task_with_label_map(fixtures_dir):
  path = fixtures_dir / "data/trec/test.txt"
  fine = sorted({line.split(" ", 1)[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()})
  task = custom_task(
    "trec",
    template="question: {text}",
    labels=list(COARSE.values()),
    label_map={f: COARSE[f.split(":")[0]] for f in fine},
  )
  ex = load_split(task, "test", files={"test": path})
  assert len(ex) == 500
  q0, q2 = "How far is it from Denver to Aspen ?", "Who was Galileo ?"
  assert ex[0] == {"inputs": f"question: {q0}", "targets": "number", "label": 5, "fields": {"text": q0}}
  assert ex[2] == {"inputs": f"question: {q2}", "targets": "human", "label": 3, "fields": {"text": q2}}
  with pytest.raises(DataError, match=r"test\.txt line 1: field 'label': 'NUM:dist' is not one of the labels"):
    load_split(custom_task("trec", template="{text}", labels=list(COARSE.values())), "test", files={"test": path})


def test_original_superglue_layouts_match_tfds_rows(tmp_path):
  multirc_raw = {
    "idx": 4,
    "passage": {
      "text": "<b>Sent 1: </b>Bo ran.<br>",
      "questions": [
        {
          "idx": 9,
          "question": "Who ran?",
          "answers": [{"idx": 0, "text": "Bo", "label": 1}, {"idx": 1, "text": "Al", "label": 0}],
        }
      ],
    },
  }
  multirc_flat = [
    {
      "paragraph": "<b>Sent 1: </b>Bo ran.<br>",
      "question": "Who ran?",
      "answer": a,
      "label": label,
      "idx": {"paragraph": 4, "question": 9, "answer": i},
    }
    for i, (a, label) in enumerate([("Bo", 1), ("Al", 0)])
  ]
  text = "Bo met Al.\n@highlight\nAl left"
  record_raw = {
    "idx": 2,
    "passage": {"text": text, "entities": [{"start": 7, "end": 8}, {"start": 0, "end": 1}, {"start": 22, "end": 23}]},
    "qas": [{"idx": 3, "query": "@placeholder left.", "answers": [{"start": 22, "end": 23, "text": "Al"}]}],
  }
  record_flat = [
    {
      "passage": text,
      "query": "@placeholder left.",
      "entities": ["Al", "Bo"],
      "answers": ["Al"],
      "idx": {"passage": 2, "query": 3},
    }
  ]
  wsc_raw = {
    "text": "Mitchell asked Tom if he could lend some money.",
    "idx": 0,
    "label": True,
    "target": {"span1_index": 2, "span1_text": "tom.", "span2_index": 4, "span2_text": "he"},
  }
  wsc_flat = [
    {
      "text": wsc_raw["text"],
      "idx": 0,
      "label": 1,
      "span1_index": 2,
      "span1_text": "Tom",
      "span2_index": 4,
      "span2_text": "he",
    }
  ]
  for name, raw, flat in [
    ("multirc", multirc_raw, multirc_flat),
    ("record", record_raw, record_flat),
    ("wsc", wsc_raw, wsc_flat),
  ]:
    got = load_split(name, "validation", files={"validation": _write_jsonl(tmp_path / "raw.jsonl", [raw])})
    want = load_split(name, "validation", files={"validation": _write_jsonl(tmp_path / "flat.jsonl", flat)})
    assert got == want and got, name


def test_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.jsonl"):
    load_split("cb", "train", files={"train": tmp_path / "nope.jsonl"})
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(DataError, match=r"task super_glue/cb: file .*empty\.jsonl has no examples"):
    load_split("cb", "train", files={"train": tmp_path / "empty.jsonl"})
  (tmp_path / "h.csv").write_text("premise,hypothesis,label\n")
  with pytest.raises(DataError, match=r"h\.csv has no examples"):
    load_split("cb", "train", files={"train": tmp_path / "h.csv"})
  (tmp_path / "bad.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": 0}\n{"premise": \n')
  with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
    load_split("cb", "train", files={"train": tmp_path / "bad.jsonl"})
  (tmp_path / "wide.csv").write_text("premise,hypothesis,label\np,h,0\np,h,0,extra\n")
  with pytest.raises(DataError, match=r"wide\.csv line 3: 4 cells but the header has 3 columns"):
    load_split("cb", "train", files={"train": tmp_path / "wide.csv"})
  (tmp_path / "short.tsv").write_text("premise\thypothesis\tlabel\np\th\n")
  with pytest.raises(
    DataError,
    match=r"short\.tsv line 2: field 'label': missing \(the row has premise, hypothesis\) \(task super_glue/cb\)",
  ):
    load_split("cb", "train", files={"train": tmp_path / "short.tsv"})
  (tmp_path / "x.txt").write_text("0 some text\n")
  with pytest.raises(DataError, match=r"x\.txt: 'LABEL text' \.txt files only fit single-text tasks"):
    load_split("cb", "train", files={"train": tmp_path / "x.txt"})
  (tmp_path / "x.parquet").write_text("")
  with pytest.raises(DataError, match=r"unsupported file type '\.parquet'"):
    load_split("cb", "train", files={"train": tmp_path / "x.parquet"})
  (tmp_path / "lonely.txt").write_text("0 fine\nlabelonly\n")
  with pytest.raises(DataError, match=r"lonely\.txt line 2: expected 'LABEL text'"):
    load_split("sst2", "train", files={"train": tmp_path / "lonely.txt"})


def test_task_examples_from_config(fixtures_dir):
  files = {"validation": str(fixtures_dir / "data/superglue/rte/val.jsonl")}
  dcfg = C.DataConfig(task="rte", taskless=True, files=files)
  split = sources.task_examples(dcfg, "validation")
  assert split.labels == ("entailment", "not_entailment") and len(split.examples) == 277
  assert split.examples[0]["inputs"].startswith("hypothesis: Christopher Reeve had an accident. premise:")
  custom = C.DataConfig(
    task="sst",
    files={"train": str(fixtures_dir / "data/sst2/train.txt")},
    custom=C.CustomTaskConfig(template="{text}", labels=("negative", "positive")),
  )
  got = sources.task_examples(custom, "train")
  assert got.labels == ("negative", "positive") and len(got.examples) == 6920
  with pytest.raises(DataError, match=r"data\.taskless applies to built-in T5 tasks"):
    sources.task_examples(C.DataConfig(task="sst", taskless=True, custom=custom.custom, files=custom.files), "train")


# -- HF datasets (a stand-in module: the package is optional and the hub is offline) -------------------


def test_hf_datasets_path(fixtures_dir, monkeypatch):
  rows = _cb_rows(fixtures_dir, 5)
  labels = ["entailment", "contradiction", "neutral"]
  hf_rows = [dict(r, label=labels.index(r["label"])) for r in rows]  # HF ClassLabel ids
  calls = []

  def load_dataset(path, name, split):
    calls.append((path, name, split))
    return list(hf_rows)

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  got = load_split("cb", "validation", hf_datasets=True)
  assert calls == [("aps/super_glue", "cb", "validation")]
  assert got == load_split("cb", "validation", files={"validation": fixtures_dir / "data/superglue/cb/val.jsonl"})[:5]
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(DataError, match=r"hf_datasets needs the `datasets` package"):
    load_split("cb", "validation", hf_datasets=True)


def test_tfds_missing_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(
    DataError,
    match=r"reading TFDS needs tensorflow-datasets \(pip install 'jaxprompt\[tfds\]'\), "
    r"or give a local file as data\.files\.validation",
  ):
    load_split("cb", "validation")
  with pytest.raises(DataError, match=r"task glue/mnli: no split 'dev'"):
    load_split("mnli", "dev")


# -- TFDS (tfds.testing.mock_data: no download) ---------------------------------------------------------


def _plain(v):
  if isinstance(v, bytes):
    return v.decode()
  if isinstance(v, dict):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, np.ndarray):
    return [_plain(x) for x in v.tolist()]
  return v.item() if isinstance(v, np.generic) else v


@pytest.fixture(scope="module")
def tfds():
  t0 = time.perf_counter()
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow  # noqa: F401  (time the real import here, not inside the first test)

  print(f"\nTF + TFDS import: {time.perf_counter() - t0:.1f}s")
  return tfds


def test_tfds_fixture_rows_match_local_files(tfds, fixtures_dir):
  import tensorflow as tf

  rows = _cb_rows(fixtures_dir)
  labels = ["entailment", "contradiction", "neutral"]

  def as_dataset(self, *args, **kwargs):  # what TFDS would store: text, ClassLabel ids, int32 idx
    return tf.data.Dataset.from_tensor_slices(
      {
        "premise": [r["premise"] for r in rows],
        "hypothesis": [r["hypothesis"] for r in rows],
        "label": np.array([labels.index(r["label"]) for r in rows], np.int64),
        "idx": np.array([r["idx"] for r in rows], np.int32),
      }
    )

  local = {"validation": fixtures_dir / "data/superglue/cb/val.jsonl"}
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    got = load_split("cb", "validation", tfds_data_dir="/nonexistent/tfds")
    got_tl = load_split(get_task("cb", taskless=True), "validation")
  assert got == load_split("cb", "validation", files=local) and len(got) == 56
  assert got_tl == load_split(get_task("cb", taskless=True), "validation", files=local)


@pytest.mark.parametrize("name", ["record", "multirc", "boolq", "wic", "copa", "stsb", "glue/rte"])
def test_tfds_mock_rows_match_local_files(tfds, tmp_path, name):
  task = get_task(name)
  with tfds.testing.mock_data(num_examples=4):
    got = load_split(task, "validation")
    raw = [_plain(ex) for ex in tfds.as_numpy(tfds.load(task.tfds_name, split="validation", shuffle_files=False))]
  assert got == load_split(task, "validation", files={"validation": _write_jsonl(tmp_path / "r.jsonl", raw)})
  assert got and all(isinstance(e["inputs"], str) and e["inputs"] for e in got)


def test_tfds_wsc_rows_match_local_files(tfds, tmp_path):
  import tensorflow as tf

  rows = [
    {
      "text": "Mitchell asked Tom if he could lend some money.",
      "span1_index": 2,
      "span1_text": "Tom",
      "span2_index": 4,
      "span2_text": "he",
      "idx": 0,
      "label": 1,
    }
  ]

  def as_dataset(self, *args, **kwargs):
    return tf.data.Dataset.from_tensor_slices({k: [r[k] for r in rows] for k in rows[0]})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    got = load_split("wsc", "validation")
  assert got == load_split("wsc", "validation", files={"validation": _write_jsonl(tmp_path / "w.jsonl", rows)})
  assert got[0]["inputs"] == "wsc: Mitchell asked Tom if *he* could lend some money."


def test_stsb_target_matches_tensorflow(tfds):
  import tensorflow as tf

  from jaxprompt.data.t5_formats import stsb_target

  scores = np.concatenate([np.arange(0, 5.0001, 0.01), np.arange(0.1, 5, 0.2), [2.5, 0.3, 4.7, 1.1, -1.0]])
  scores = scores.astype(np.float32)
  x = tf.constant(scores)
  want = [s.decode() for s in tf.as_string(tf.round(x * 5) / 5, precision=1).numpy()]  # T5's expression
  assert [stsb_target(float(s)) for s in scores] == want
