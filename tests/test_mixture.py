"""Many tasks in one run: task mixtures (seqio-style sampling, resumable per member), one prompt per task trained
together (`prompt.per_task`), per-task evaluation, export of every task's adapter plus the bank, and selecting one
task's prompt by name (`SOURCE@TASK`) wherever a prompt is taken."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.batches import Seq2SeqBatch, concat_rows
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.cli import main
from jaxprompt.data.pipeline import MixtureStream, mixing_rates
from jaxprompt.errors import CheckpointError, ConfigError, PromptError
from jaxprompt.evaluation.evaluator import evaluator_for
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.run import build_run
from jaxprompt.training.trainer import train
from tests.helpers import fully_optimized, small_cfg, train_interrupted

ROOT = Path(__file__).resolve().parent.parent
MAX, MIN = "quickstart:max", "quickstart:min"


def _rows(n: int) -> Seq2SeqBatch:
  ids = np.arange(n, dtype=np.int32)[:, None].repeat(3, 1)
  return Seq2SeqBatch(ids, np.ones_like(ids), ids[:, :2], np.ones_like(ids[:, :2]))


# -- sampling ------------------------------------------------------------------------------------------------------


def test_mixing_rates_are_examples_proportional_capped_or_explicit():
  np.testing.assert_allclose(mixing_rates([100, 300], [None, None]), [0.25, 0.75])
  np.testing.assert_allclose(mixing_rates([100, 300], [None, None], cap=100), [0.5, 0.5])  # seqio's maximum
  np.testing.assert_allclose(mixing_rates([100, 300], [3.0, 1.0]), [0.75, 0.25])


def test_mixture_stream_draws_by_rate_walks_each_member_s_epochs_and_resumes_exactly():
  sizes = [10, 30]
  rows = _rows(sum(sizes))
  stream = MixtureStream(rows, sizes, [0.8, 0.2], 16, seed=3)
  batches = [next(stream).input_ids[:, 0] for _ in range(50)]
  drawn = np.concatenate(batches)
  first = drawn < 10
  assert 0.75 < first.mean() < 0.85  # 800 draws at rate 0.8
  # member 0 (10 rows) goes through whole epochs: each block of 10 of its draws is a permutation of its rows
  mine = drawn[first]
  for e in range(len(mine) // 10):
    assert sorted(mine[10 * e : 10 * (e + 1)]) == list(range(10))
  assert stream.member_positions == [int(first.sum()), int((~first).sum())]
  # resuming from (position, member positions) continues the same sequence
  again = MixtureStream(rows, sizes, [0.8, 0.2], 16, seed=3)
  for _ in range(20):
    next(again)
  resumed = MixtureStream(
    rows, sizes, [0.8, 0.2], 16, seed=3, position=again.position, member_positions=again.member_positions
  )
  for k in range(20, 50):
    np.testing.assert_array_equal(next(resumed).input_ids[:, 0], batches[k])
  # every host draws the same global batch and keeps its own share
  hosts = [MixtureStream(rows, sizes, [0.8, 0.2], 16, seed=3, process_index=i, process_count=2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([next(h).input_ids[:, 0] for h in hosts]), batches[0])


def test_task_ids_travel_with_the_rows():
  a, b = _rows(3).with_task_ids(0), _rows(2).with_task_ids(1)
  both = concat_rows([a, b])
  assert both.task_ids.tolist() == [0, 0, 0, 1, 1] and both.size == 5
  assert _rows(2).task_ids is None


# -- config checks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "data, prompt, match",
  [
    ({"mixture": [{"task": MAX}, {"task": MAX}]}, {}, "appears more than once"),
    ({"mixture": [{"task": MAX, "rate": 1.0}, {"task": MIN}]}, {}, "every member a rate, or none"),
    ({"mixture": [{"task": MAX, "rate": 0}]}, {}, "a rate must be > 0"),
    ({"mixture": [{"task": MAX}], "files": {"train": "x.jsonl"}}, {}, r"data.files names one task's data"),
    ({"mixture": [{"task": MAX}], "group_by_length": 4}, {}, "group_by_length does not apply"),
    ({"mixture_cap": 10}, {}, "mixture_cap applies to a data.mixture"),
    ({"mixture": [{"task": MAX, "weight": 2}]}, {}, r"unknown config key 'data.mixture\[0\].weight'"),
  ],
)
def test_bad_mixtures_are_one_line_errors(data, prompt, match):
  with pytest.raises(ConfigError, match=match):
    C.from_dict({"data": data, "prompt": prompt})


def test_per_task_prompts_need_a_mixture_and_a_bankable_method(byte_t5):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match="prompt.per_task trains one prompt per task of a data.mixture"):
    build_run(small_cfg(byte_t5, **{"prompt.per_task": True}), mesh=mesh, with_train_data=False)
  mix = {"data.mixture": [{"task": MAX}, {"task": MIN}], "data.task": "quickstart", "prompt.per_task": True}
  with pytest.raises(ConfigError, match="a bank of P-tuning encoders is not supported"):
    build_run(small_cfg(byte_t5, **mix, **{"prompt.method": "p_tuning"}), mesh=mesh, with_train_data=False)
  with pytest.raises(
    ConfigError,
    match=r"eval.metric 'bleu'.*available: eval_loss, eval_seq_accuracy, accuracy, "
    r"quickstart:max/eval_loss",
  ):
    build_run(small_cfg(byte_t5, **mix, **{"eval.metric": "bleu"}), mesh=mesh, with_train_data=False)


# -- training a bank -------------------------------------------------------------------------------------------------


def _mix_cfg(folder, **over):
  return small_cfg(
    folder,
    **{"data.mixture": [{"task": MAX, "rate": 1.0}, {"task": MIN, "rate": 2.0}], "prompt.per_task": True, **over},
  )


def test_a_resumed_mixture_equals_an_uninterrupted_one(byte_t5, tmp_path):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  full = _mix_cfg(byte_t5)
  train_interrupted(full, _mix_cfg(byte_t5, **{"train.steps": 3}), tmp_path, mesh)

  def final(workdir):
    tp = load_prompt_source(f"{workdir}@{MIN}", step=6)
    return tp, Checkpointer(workdir / "checkpoints").read_meta(6)

  (a, meta_a), (b, meta_b) = final(tmp_path / "full"), final(tmp_path / "split")
  np.testing.assert_array_equal(a.value, b.value)
  np.testing.assert_array_equal(
    load_prompt_source(f"{tmp_path / 'full'}@{MAX}", step=6).value,
    load_prompt_source(f"{tmp_path / 'split'}@{MAX}", step=6).value,
  )
  assert meta_a["member_positions"] == meta_b["member_positions"] and sum(meta_a["member_positions"]) == 6 * 8
  assert meta_a["task"]["per_task"] and [m["name"] for m in meta_a["task"]["mixture"]] == [MAX, MIN]
  # both prompts trained, from the same start (each where a run on its task alone would start)
  run, _ = build_run(full, mesh=mesh, with_train_data=False)
  start = np.asarray(run.prompt["prompt"]["embeddings"])
  assert start.shape[:2] == (2, 4) and np.array_equal(start[0], start[1])
  alone, _ = build_run(small_cfg(byte_t5), mesh=mesh, with_train_data=False)
  np.testing.assert_array_equal(start[0], np.asarray(alone.prompt["prompt"]["embeddings"]))
  assert not np.allclose(a.value, start[1]) and not np.allclose(
    a.value, load_prompt_source(f"{tmp_path / 'full'}@{MAX}", step=6).value
  )
  # a workdir resumes only with the tasks it was trained on
  with pytest.raises(
    CheckpointError,
    match=r"trained on the tasks \['quickstart:max', 'quickstart:min'\], but the "
    r"config has \['quickstart:min', 'quickstart:max'\]",
  ):
    train(
      small_cfg(byte_t5, **{"data.mixture": [{"task": MIN}, {"task": MAX}], "prompt.per_task": True, "train.steps": 8}),
      tmp_path / "full",
      progress=False,
      mesh=mesh,
    )


def test_a_shared_prompt_trains_on_a_mixture_with_the_union_of_labels(byte_t5, tmp_path):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  cfg = small_cfg(
    byte_t5,
    **{
      "data.mixture": [{"task": MAX}, {"task": MIN}],
      "prompt.init": "class_labels",
      "prompt.length": 12,
      "train.steps": 2,
    },
  )
  run, data = build_run(cfg, mesh=mesh)
  assert run.labels == tuple(str(i) for i in range(10)) and len(data) == 2 and not run.per_task
  train(cfg, tmp_path, progress=False, mesh=mesh)
  tp = load_prompt_source(tmp_path, step="latest")  # one prompt: no task to choose
  assert tp.value.shape[0] == 12 and tp.record.task.name == f"{MAX}+{MIN}"
  with pytest.raises(PromptError, match="holds one prompt, not one per task"):
    load_prompt_source(f"{tmp_path}@{MAX}", step="latest")


# -- the quickstart mixture, end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart_runs(tmp_path_factory):
  """configs/mixture.yaml as shipped (max + min, taskless, one prompt each) and the quickstart's prompt trained
  alone on each task (a sweep over data.task: one loaded base, shared compiled programs)."""
  from jaxprompt.tools.sweep import sweep

  mp = pytest.MonkeyPatch()
  mp.setenv(
    "JAXPROMPT_CACHE",
    os.environ.get("JAXPROMPT_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxprompt"),
  )
  root = tmp_path_factory.mktemp("mixture")
  with fully_optimized():  # hundreds of steps
    summary = train(C.load(ROOT / "configs" / "mixture.yaml"), root / "mix", progress=False)
    tasks = [("data.task", [MAX, MIN])]
    alone = sweep(str(ROOT / "configs" / "quickstart.yaml"), root / "alone", tasks, progress=False)
  yield root, summary, alone
  mp.undo()


def test_one_run_trains_a_prompt_per_task_to_the_quickstart_s_accuracy(quickstart_runs):
  root, summary, alone = quickstart_runs
  evals = [json.loads(line) for line in (root / "mix" / "metrics.jsonl").read_text().splitlines()]
  best = next(e for e in evals if e["kind"] == "eval" and e["step"] == summary.best_step)
  for task in (MAX, MIN):
    assert best[f"{task}/accuracy"] >= 0.97, best  # measured: 0.990 / 0.996 at step 400 (alone: 0.998 / 0.998)
  assert best["accuracy"] == pytest.approx((best[f"{MAX}/accuracy"] + best[f"{MIN}/accuracy"]) / 2)
  records = [
    json.loads(line)
    for line in (root / "mix" / "predictions" / f"step_{summary.best_step}.jsonl").read_text().splitlines()
  ]
  assert {r["task"] for r in records} == {MAX, MIN} and len(records) == 1000
  confusion = json.loads((root / "mix" / "predictions" / f"confusion_step_{summary.best_step}.json").read_text())
  assert set(confusion["tasks"]) == {MAX, MIN} and (root / "mix" / "curves.png").stat().st_size > 10_000
  # within 2 points of the quickstart prompt trained alone on each task
  by_task = {row["overrides"]["data.task"]: row["best_value"] for row in alone}
  for task in (MAX, MIN):
    assert abs(best[f"{task}/accuracy"] - by_task[task]) <= 0.02, (task, best, by_task)


def test_every_task_s_export_is_its_prompt_and_scores_as_in_the_mixture(quickstart_runs, tmp_path):
  root, summary, _ = quickstart_runs
  out = export_prompt(root / "mix", "peft", tmp_path / "exports")
  assert sorted(p.name for p in out.iterdir()) == ["bank.safetensors", "quickstart_max", "quickstart_min"]
  bank = load_prompt_source(f"{out / 'bank.safetensors'}@{MIN}")
  evals = {
    json.loads(line)["step"]: json.loads(line)
    for line in (root / "mix" / "metrics.jsonl").read_text().splitlines()
    if '"kind": "eval"' in line
  }
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  for task, slug in ((MAX, "quickstart_max"), (MIN, "quickstart_min")):
    adapter = load_prompt_source(out / slug)
    assert json.loads((out / slug / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    np.testing.assert_array_equal(adapter.value, load_prompt_source(f"{root / 'mix'}@{task}").value)
    assert adapter.record.task.name == task and adapter.record.step == summary.best_step
    # the adapter alone, in a single-task run of its task, scores what the mixture's evaluation reported for it
    cfg = C.load(ROOT / "configs" / "quickstart.yaml", [f"data.task={task}"])
    run, _ = build_run(cfg, mesh=mesh, with_train_data=False)
    metrics, _ = evaluator_for(run)({"prompt": {"embeddings": jax.numpy.asarray(adapter.value)}})
    assert metrics["accuracy"] == evals[summary.best_step][f"{task}/accuracy"]
  np.testing.assert_array_equal(bank.value, load_prompt_source(out / "quickstart_min").value)
  # other formats: one file per task (with its provenance) plus the bank; --with-base: one base for every adapter
  npy = export_prompt(root / "mix", "numpy", tmp_path / "npy")
  assert sorted(p.name for p in npy.iterdir()) == [
    "bank.safetensors",
    "quickstart_max.json",
    "quickstart_max.npy",
    "quickstart_min.json",
    "quickstart_min.npy",
  ]
  np.testing.assert_array_equal(np.load(npy / "quickstart_max.npy"), load_prompt_source(out / "quickstart_max").value)
  assert load_prompt_source(npy / "quickstart_max.npy").record.task.name == MAX
  with_base = export_prompt(f"{root / 'mix'}", "peft", tmp_path / "with_base", with_base=True)
  assert (with_base / "base" / "model.safetensors").exists() and not (with_base / "quickstart_max" / "base").exists()
  named = json.loads((with_base / "quickstart_min" / "adapter_config.json").read_text())["base_model_name_or_path"]
  assert named == str((with_base / "base").absolute())
  with pytest.raises(PromptError, match=r"holds one prompt per task \(quickstart:max, quickstart:min\): choose one"):
    load_prompt_source(root / "mix")
  with pytest.raises(PromptError, match="no prompt for task 'quickstart:first'"):
    load_prompt_source(f"{root / 'mix'}@quickstart:first")


def test_eval_generate_and_serve_take_a_task_s_prompt_by_name(quickstart_runs, tmp_path, capsys):
  from jaxprompt.models.loading import load_model
  from jaxprompt.serve.engine import PromptStore

  root, summary, _ = quickstart_runs
  mix = root / "mix"
  # eval of a per-task workdir reports every task and their mean
  assert main(["eval", str(ROOT / "configs" / "mixture.yaml"), "--workdir", str(mix)]) == 0
  scores = json.loads(capsys.readouterr().out)
  assert scores["step"] == summary.best_step and scores["accuracy"] == pytest.approx(summary.best_value)
  assert {f"{MAX}/accuracy", f"{MIN}/accuracy"} <= set(scores)
  # generate: the same input under each task's prompt (one mixed batch), by name
  assert (
    main(["generate", "--prompt", f"{mix}@{MAX}", "--prompt", f"{mix}@quickstart_min", "--input", "3 9 6 3 1"]) == 0
  )
  assert capsys.readouterr().out.split() == ["9", "1"]
  # serve: a per-task workdir (or its export folder) is one prompt per task
  export_prompt(mix, "peft", tmp_path / "exports")
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "mix").symlink_to(mix)
  store = PromptStore(load_model("builtin:quickstart"))
  assert store.load_dir(tmp_path / "runs") == [] and store.names() == ["mix.quickstart_max", "mix.quickstart_min"]
  store = PromptStore(load_model("builtin:quickstart"))
  assert store.load_dir(tmp_path / "exports") == [] and store.names() == ["quickstart_max", "quickstart_min"]
  assert store.get("quickstart_min").labels == tuple(str(i) for i in range(10))
