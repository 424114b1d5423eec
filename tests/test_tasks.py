"""Built-in tasks reproduce T5's text formats exactly; custom tasks; clear errors for bad rows.

Expected strings are written out literally, derived by hand from T5's preprocessors
(t5/data/preprocessors.py `glue`, `stsb`, `wsc_simple`, `record`; glue_utils.py feature orders).
"""

import json

import pytest

from jaxprompt.data.sources import load_split
from jaxprompt.data.tasks import ALIASES, BUILTIN, custom_task, get_task
from jaxprompt.errors import DataError


def _jsonl(tmp_path, rows, name="rows.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


def _load(task, tmp_path, rows, split="validation", keep_fields=False, **kw):
  """The examples of `rows`; without their "fields" (what prompt templates place) unless `keep_fields`."""
  out = load_split(task, split, files={split: _jsonl(tmp_path, rows)}, **kw)
  return out if keep_fields else [{k: v for k, v in ex.items() if k != "fields"} for ex in out]


# -- SuperGLUE from the real fixture files -------------------------------------------------------------

RTE_0 = (
  "rte hypothesis: Christopher Reeve had an accident. premise: Dana Reeve, the widow of the actor Christopher "
  "Reeve, has died of lung cancer at age 44, according to the Christopher Reeve Foundation."
)
CB_0 = (
  "cb hypothesis: Valence was helping premise: Valence the void-brain, Valence the virtuous valet. Why couldn't "
  "the figger choose his own portion of titanic anatomy to shaft? Did he think he was helping?"
)


def test_rte_fixture_t5_and_taskless(fixtures_dir):
  files = {"validation": fixtures_dir / "data/superglue/rte/val.jsonl"}
  ex = load_split("rte", "validation", files=files)
  assert len(ex) == 277
  assert ex[0] == {"inputs": RTE_0, "targets": "not_entailment", "label": 1, "fields": ex[0]["fields"]}
  assert f"rte hypothesis: {ex[0]['fields']['hypothesis']} premise: {ex[0]['fields']['premise']}" == RTE_0
  assert ex[1]["targets"] == "entailment" and ex[1]["label"] == 0
  tl = load_split(get_task("rte", taskless=True), "validation", files=files)
  assert tl[0]["inputs"] == RTE_0[len("rte ") :]
  assert tl[0]["inputs"].startswith("hypothesis: Christopher Reeve had an accident. premise: Dana Reeve,")
  assert [e["targets"] for e in tl] == [e["targets"] for e in ex]


def test_cb_fixture_t5_and_taskless(fixtures_dir):
  files = {
    "train": fixtures_dir / "data/superglue/cb/train.jsonl",
    "validation": fixtures_dir / "data/superglue/cb/val.jsonl",
  }
  val = load_split("cb", "validation", files=files)
  assert len(val) == 56 and len(load_split("super_glue/cb", "train", files=files)) == 250
  assert val[0] == {"inputs": CB_0, "targets": "contradiction", "label": 1, "fields": val[0]["fields"]}
  assert f"cb hypothesis: {val[0]['fields']['hypothesis']} premise: {val[0]['fields']['premise']}" == CB_0
  assert val[1]["inputs"] == (
    "cb hypothesis: there is a shipment premise: ``Who knows? The point is, do we go with it "
    "or not?'' Do we assume there is a shipment?"
  )
  assert (val[1]["targets"], val[1]["label"]) == ("neutral", 2)
  tl = load_split(get_task("cb", taskless=True), "validation", files=files)
  assert tl[0]["inputs"] == (
    "hypothesis: Valence was helping premise: Valence the void-brain, Valence the virtuous "
    "valet. Why couldn't the figger choose his own portion of titanic anatomy to shaft? Did "
    "he think he was helping?"
  )
  assert get_task("cb").metrics == ("macro_f1", "accuracy")


# -- SuperGLUE from literal rows in tmp files ----------------------------------------------------------

BOOLQ = [
  {
    "question": "is the golden gate bridge painted red",
    "idx": 0,
    "label": False,
    "passage": "The Golden Gate Bridge -- Its color is International Orange, chosen to complement the natural "
    "surroundings.",
  },
  {
    "question": "can you see the milky way from earth",
    "passage": "Milky Way -- Seen from Earth, it appears as a band.",
    "idx": 1,
    "label": True,
  },
  {"question": "does it rain in the atacama", "passage": "Atacama — one of the driest places", "idx": 2, "label": 0},
]


def test_boolq(tmp_path):
  ex = _load("boolq", tmp_path, BOOLQ)
  assert ex[0] == {
    "inputs": "boolq passage: The Golden Gate Bridge -- Its color is International Orange, chosen to "
    "complement the natural surroundings. question: is the golden gate bridge painted red",
    "targets": "False",
    "label": 0,
  }
  assert ex[1] == {
    "inputs": "boolq passage: Milky Way -- Seen from Earth, it appears as a band. question: can you see "
    "the milky way from earth",
    "targets": "True",
    "label": 1,
  }
  assert ex[2]["inputs"] == "boolq passage: Atacama — one of the driest places question: does it rain in the atacama"
  assert ex[2]["targets"] == "False"  # an integer label is an index into (False, True)
  tl = _load(get_task("boolq", taskless=True), tmp_path, BOOLQ)
  assert (
    tl[1]["inputs"] == "passage: Milky Way -- Seen from Earth, it appears as a band. question: can you see the "
    "milky way from earth"
  )


COPA = [
  {
    "premise": "My body cast a shadow over the grass.",
    "choice1": "The sun was rising.",
    "choice2": "The grass was cut.",
    "question": "cause",
    "idx": 0,
    "label": 0,
  },
  {
    "premise": "The woman repaired her faucet.",
    "choice1": "The faucet was leaky.",
    "choice2": "The faucet was turned off.",
    "question": "cause",
    "idx": 1,
    "label": "choice1",
  },
  {
    "premise": "I tipped the bottle.",
    "choice1": "The liquid in the bottle froze.",
    "choice2": "The liquid in the bottle poured out.",
    "question": "effect",
    "idx": 2,
    "label": 1,
  },
]


def test_copa(tmp_path):
  ex = _load("copa", tmp_path, COPA)
  # T5 sorts the features: choice1, choice2, premise, question.
  assert ex[0] == {
    "inputs": "copa choice1: The sun was rising. choice2: The grass was cut. premise: My body cast a "
    "shadow over the grass. question: cause",
    "targets": "choice1",
    "label": 0,
  }
  assert ex[1]["targets"] == "choice1"
  assert ex[2] == {
    "inputs": "copa choice1: The liquid in the bottle froze. choice2: The liquid in the bottle poured "
    "out. premise: I tipped the bottle. question: effect",
    "targets": "choice2",
    "label": 1,
  }
  tl = _load(get_task("copa", taskless=True), tmp_path, COPA)
  assert tl[0]["inputs"] == (
    "choice1: The sun was rising. choice2: The grass was cut. premise: My body cast a shadow "
    "over the grass. question: cause"
  )


WIC = [
  {
    "word": "place",
    "sentence1": "Do you want to come over to my place later?",
    "sentence2": "A political system with no place for the less prominent groups.",
    "start1": 31,
    "start2": 27,
    "end1": 36,
    "end2": 32,
    "idx": 0,
    "label": False,
  },
  {
    "word": "beat",
    "sentence1": "We beat the competition.",
    "sentence2": "Agassi beat Becker in the tennis championship.",
    "start1": 3,
    "start2": 7,
    "end1": 7,
    "end2": 11,
    "idx": 1,
    "label": True,
  },
]


def test_wic(tmp_path):
  ex = _load("wic", tmp_path, WIC)
  # glue_utils fixes WiC's order (sentence1, sentence2, word) and leaves out the start/end indices.
  assert ex[0] == {
    "inputs": "wic sentence1: Do you want to come over to my place later? sentence2: A political system "
    "with no place for the less prominent groups. word: place",
    "targets": "False",
    "label": 0,
  }
  assert ex[1] == {
    "inputs": "wic sentence1: We beat the competition. sentence2: Agassi beat Becker in the tennis "
    "championship. word: beat",
    "targets": "True",
    "label": 1,
  }
  tl = _load(get_task("wic", taskless=True), tmp_path, WIC)
  assert tl[1]["inputs"] == (
    "sentence1: We beat the competition. sentence2: Agassi beat Becker in the tennis championship. word: beat"
  )


WSC = [
  {
    "text": "Mitchell asked Tom if he could lend some money.",
    "span1_index": 2,
    "span1_text": "Tom",
    "span2_index": 4,
    "span2_text": "he",
    "idx": 0,
    "label": 1,
  },
  {
    "text": "Mitchell asked Tom if he could lend some money.",
    "span1_index": 0,
    "span1_text": "Mitchell",
    "span2_index": 4,
    "span2_text": "he",
    "idx": 1,
    "label": 0,
  },
]


def test_wsc_simple(tmp_path):
  val = _load("wsc", tmp_path, WSC)
  assert val == [
    {"inputs": "wsc: Mitchell asked Tom if *he* could lend some money.", "targets": "Tom", "referent_correct": True},
    {
      "inputs": "wsc: Mitchell asked Tom if *he* could lend some money.",
      "targets": "Mitchell",
      "referent_correct": False,
    },
  ]
  train = _load("wsc", tmp_path, WSC, split="train")  # T5 trains on the right referents only
  assert [e["targets"] for e in train] == ["Tom"]
  tl = _load(get_task("wsc", taskless=True), tmp_path, WSC)
  assert tl[0]["inputs"] == "Mitchell asked Tom if *he* could lend some money."
  assert get_task("wsc").labels is None and get_task("wsc").tfds_name == "super_glue/wsc.fixed"


def test_wsc_special_case_and_bad_span(tmp_path):
  text = (
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite loud. "
    '"Good for him," he said. '
  )
  row = {"text": text, "span1_index": 0, "span1_text": "The boy", "span2_index": 22, "span2_text": "him", "label": 1}
  ex = _load("wsc", tmp_path, [row])
  assert ex[0]["inputs"] == (
    "wsc: The boy continued to whip the pony , and eventually the pony threw him over. John "
    'laughed out quite loud. "Good for *him* ," he said.'
  )
  bad = dict(WSC[0], span2_index=3)
  with pytest.raises(DataError, match=r"rows\.jsonl line 1: field 'span2_index': word 3 is 'if', not span2_text 'he'"):
    _load("wsc", tmp_path, [bad])


def test_multirc(tmp_path):
  row = {
    "paragraph": "<b>Sent 1: </b>Alice went home.<br><b>Sent 2: </b>She slept.<br>",
    "question": "Where did Alice go?",
    "answer": "Home",
    "label": 1,
    "idx": {"paragraph": 3, "question": 7, "answer": 0},
  }
  ex = _load("multirc", tmp_path, [row])
  # Fixed order question, answer, paragraph; <br> -> space, <b>/</b> removed after joining.
  assert ex == [
    {
      "inputs": "multirc question: Where did Alice go? answer: Home paragraph: Sent 1: Alice went home. "
      "Sent 2: She slept. ",
      "targets": "True",
      "label": 1,
      "group": "3-7",
    }
  ]
  tl = _load(get_task("multirc", taskless=True), tmp_path, [row])
  assert tl[0]["inputs"].startswith("question: Where did Alice go? answer: Home paragraph: Sent 1:")


def test_record(tmp_path):
  row = {
    "passage": "The cat sat.\n@highlight\nCats like mats\n@highlight\nDogs do not",
    "query": "@placeholder likes mats.",
    "entities": ["Cats", "Dogs"],
    "answers": ["Cats", "cat"],
    "idx": {"passage": 0, "query": 5},
  }
  ex = _load("record", tmp_path, [row])
  inputs = (
    "record query: @placeholder likes mats. entities: Cats, Dogs passage: The cat sat. Cats like mats. Dogs do not"
  )
  assert ex == [
    {"inputs": inputs, "targets": "Cats", "answers": ["Cats", "cat"], "group": "0-5"},
    {"inputs": inputs, "targets": "cat", "answers": ["Cats", "cat"], "group": "0-5"},
  ]
  test = _load("record", tmp_path, [dict(row, answers=[])], split="test")
  assert [e["targets"] for e in test] == ["<unk>"]
  assert _load(get_task("record", taskless=True), tmp_path, [row])[0]["inputs"] == inputs[len("record ") :]


# -- GLUE ----------------------------------------------------------------------------------------------


def test_glue_formats(tmp_path):
  cases = [
    (
      "cola",
      {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1, "idx": 0},
      "cola sentence: The sailors rode the breeze clear of the rocks.",
      "acceptable",
    ),
    (
      "sst2",
      {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0},
      "sst2 sentence: it 's a charming and often affecting journey . ",
      "positive",
    ),
    (
      "mrpc",
      {"sentence1": "He said so.", "sentence2": "So he said.", "label": 1, "idx": 0},
      "mrpc sentence1: He said so. sentence2: So he said.",
      "equivalent",
    ),
    (
      "qqp",
      {"question1": "Why do I get bored?", "question2": "Why am I bored?", "label": 0, "idx": 0},
      "qqp question1: Why do I get bored? question2: Why am I bored?",
      "not_duplicate",
    ),
    (
      "mnli",
      {"premise": "A man eats.", "hypothesis": "Nobody eats.", "label": 2, "idx": 0},
      "mnli hypothesis: Nobody eats. premise: A man eats.",
      "contradiction",
    ),
    (
      "qnli",
      {"question": "Who ate?", "sentence": "A man ate.", "label": "entailment", "idx": 0},
      "qnli question: Who ate? sentence: A man ate.",
      "entailment",
    ),
    (
      "glue/rte",
      {"sentence1": "A man ate.", "sentence2": "A person ate.", "label": 0, "idx": 0},
      "rte sentence1: A man ate. sentence2: A person ate.",
      "entailment",
    ),
  ]
  for name, row, inputs, target in cases:
    ex = _load(name, tmp_path, [row])
    assert (ex[0]["inputs"], ex[0]["targets"]) == (inputs, target), name
    assert ex[0]["label"] == get_task(name).labels.index(target)
    tl = _load(get_task(name, taskless=True), tmp_path, [row])
    assert tl[0]["inputs"] == inputs.split(" ", 1)[1], name


def test_stsb_rounds_like_t5(tmp_path):
  rows = [
    {"sentence1": "A man is playing a flute.", "sentence2": "A man is playing a bamboo flute.", "label": s, "idx": i}
    for i, s in enumerate([3.8667, 2.5, 0.1, 0.3, 5.0, 1.8, -1.0])
  ]
  ex = _load("stsb", tmp_path, rows)
  assert ex[0]["inputs"] == "stsb sentence1: A man is playing a flute. sentence2: A man is playing a bamboo flute."
  # nearest 0.2, ties to even (tf.round), one decimal; -1 (TFDS's unlabeled test rows) stays -1.0
  assert [e["targets"] for e in ex] == ["3.8", "2.4", "0.0", "0.4", "5.0", "1.8", "-1.0"]
  assert [e["label"] for e in ex] == [19, 12, 0, 2, 25, 9, -1]
  assert get_task("stsb").labels[19] == "3.8" and len(get_task("stsb").labels) == 26


def test_unlabeled_rows_get_t5_unk(tmp_path):
  ex = _load(
    "rte", tmp_path, [{"premise": "p", "hypothesis": "h", "label": -1, "idx": 0}], split="test", keep_fields=True
  )
  fields = {"hypothesis": "h", "premise": "p"}
  assert ex == [{"inputs": "rte hypothesis: h premise: p", "targets": "<unk>", "label": -1, "fields": fields}]


def test_every_builtin_task_resolves():
  assert set(ALIASES.values()) <= set(BUILTIN)
  for name in [
    "boolq",
    "cb",
    "copa",
    "multirc",
    "record",
    "rte",
    "wic",
    "wsc",
    "cola",
    "sst2",
    "mrpc",
    "qqp",
    "stsb",
    "mnli",
    "qnli",
    "glue/rte",
    "super_glue/rte",
    "super_glue/wsc.fixed",
  ]:
    t = get_task(name)
    assert t.tfds_name and t.hf_name and t.metrics
  assert get_task("rte").name == "super_glue/rte" and get_task("glue/rte").name == "glue/rte"
  assert get_task("mnli").resolve_split("validation") == "validation_matched"
  with pytest.raises(DataError, match=r"unknown task 'bolq' \(did you mean 'boolq'\?\)"):
    get_task("bolq")
  with pytest.raises(DataError, match=r"task glue/mnli: no split 'dev'"):
    get_task("mnli").resolve_split("dev")


# -- errors naming file, line and field -----------------------------------------------------------------


def test_bad_rows_name_file_line_and_field(tmp_path):
  good = {"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}
  cases = [
    ({"hypothesis": "h", "label": "neutral"}, r"field 'premise': missing"),
    (
      dict(good, label="maybe"),
      r"field 'label': 'maybe' is not one of the labels \(entailment, contradiction, "
      r"neutral\)",
    ),
    (dict(good, label=3), r"field 'label': label index 3 is outside 0\.\.2"),
    (dict(good, label=True), r"field 'label': boolean label True needs the labels \(False, True\)"),
    (dict(good, label=None), r"field 'label': missing"),
    (dict(good, premise=["a"]), r"field 'premise': expected text"),
  ]
  for bad, msg in cases:
    with pytest.raises(DataError, match=r"rows\.jsonl line 2: " + msg + r".* \(task super_glue/cb\)$"):
      _load("cb", tmp_path, [good, bad])


# -- custom tasks ----------------------------------------------------------------------------------------


def test_custom_task_columns_template_labels(tmp_path):
  task = custom_task(
    "sentiment",
    columns={"text": "sentence"},
    template="classify: {text} ({source})",
    labels=["negative", "positive"],
    label_column="y",
  )
  rows = [
    {"sentence": "great fun", "source": "web", "y": 1},
    {"sentence": "dull", "source": "web", "y": "negative"},
    {"sentence": "fine", "source": "web", "y": "1"},
  ]
  ex = _load(task, tmp_path, rows, keep_fields=True)
  assert ex == [
    {"inputs": f"classify: {t} (web)", "targets": y, "label": k, "fields": {"text": t, "source": "web"}}
    for t, y, k in (("great fun", "positive", 1), ("dull", "negative", 0), ("fine", "positive", 1))
  ]
  with pytest.raises(
    DataError, match=r"rows\.jsonl line 1: field 'sentence': missing \(the row has text, source, y\) \(task sentiment\)"
  ):
    _load(task, tmp_path, [{"text": "x", "source": "s", "y": 1}])
  with pytest.raises(DataError, match=r"line 1: field 'y': label index 2 is outside 0\.\.1"):
    _load(task, tmp_path, [{"sentence": "x", "source": "s", "y": 2}])
  with pytest.raises(DataError, match=r"no file for split 'train'"):
    load_split(task, "train", files={"validation": tmp_path / "rows.jsonl"})
  with pytest.raises(DataError, match=r"custom task reads local files only; set data.files.train"):
    load_split(task, "train")


def test_custom_task_generative_and_label_map(tmp_path):
  gen = custom_task("qa", template="question: {q}", label_column="answer")
  assert gen.labels is None and gen.metrics == ("exact_match", "token_f1")
  want = [{"inputs": "question: 2+2?", "targets": "4", "fields": {"q": "2+2?"}}]
  assert _load(gen, tmp_path, [{"q": "2+2?", "answer": "4"}], keep_fields=True) == want
  mapped = custom_task("m", template="{text}", labels=["no", "yes"], label_map={"N": "no", "Y": "yes"})
  assert [e["label"] for e in _load(mapped, tmp_path, [{"text": "a", "label": "Y"}, {"text": "b", "label": "N"}])] == [
    1,
    0,
  ]


def test_custom_task_definition_errors():
  with pytest.raises(DataError, match=r"template 'x: \{0\}': fields must be plain names"):
    custom_task("t", template="x: {0}")
  with pytest.raises(DataError, match=r"template 'none' uses no column"):
    custom_task("t", template="none")
  with pytest.raises(DataError, match=r"columns \['other'\] are not fields of the template"):
    custom_task("t", template="{text}", columns={"other": "c"})
  with pytest.raises(DataError, match=r"label_map values \['maybe'\] are not labels"):
    custom_task("t", template="{text}", labels=["a", "b"], label_map={"m": "maybe"})
  with pytest.raises(DataError, match=r"metrics \['pearson'\] do not fit a generative task"):
    custom_task("t", template="{text}", metrics=["pearson"])
