"""Off the happy path (issue 28): what used to end in a traceback (or did the unexpected) is one line and exit 2, or
does what a user means: reusing a workdir with another prompt or optimizer, an empty prompt, outputs where they
cannot go, a taken port, --set values and typos, generate's flags, eval of a workdir alone."""

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxprompt import config as C
from jaxprompt.cli import EXIT_USER_ERROR, _generate_config, _read_inputs, build_parser, main
from jaxprompt.prompts.io import load_prompt_source
from tests.helpers import run_cli, write_config


def _err(capsys, argv) -> str:
  capsys.readouterr()
  code = main([str(a) for a in argv])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == EXIT_USER_ERROR, err
  assert err and err[-1].startswith("jaxprompt: error: ")
  return err[-1]


@pytest.fixture(scope="module")
def trained(byte_t5, tmp_path_factory):
  """(config, workdir): 2 steps of the tiny quickstart run, checkpointed at the end."""
  root = tmp_path_factory.mktemp("trained")
  cfg = write_config(byte_t5, root / "c.yaml", 2)
  assert main(["train", str(cfg), "--workdir", str(root / "w"), "--no-progress"]) == 0
  return cfg, root / "w"


def test_resuming_with_another_prompt_or_optimizer_state_is_refused_before_any_work(trained, tmp_path, capsys):
  cfg, w0 = trained
  w = tmp_path / "w"
  shutil.copytree(w0, w)
  recorded = (w / "config.yaml").read_text()
  msg = _err(capsys, ["train", cfg, "--workdir", w, "--set", "prompt.length=6"])
  assert "prompt.length 4 -> 6" in msg and "use another --workdir or delete this one" in msg and str(w) in msg
  msg = _err(capsys, ["train", cfg, "--workdir", w, "--set", "optimizer.name=adam", "--set", "prompt.length=5"])
  assert "prompt.length 4 -> 5" in msg and "optimizer.name adafactor -> adam" in msg
  msg = _err(capsys, ["train", cfg, "--workdir", w, "--set", "optimizer.grad_clip_norm=1.0"])
  assert "optimizer.grad_clip_norm None -> 1.0" in msg
  assert (w / "config.yaml").read_text() == recorded  # refused before anything was written
  # keys that do not shape the state still resume
  out = run_cli(
    capsys,
    "train",
    cfg,
    "--workdir",
    w,
    "--no-progress",
    "--set",
    "train.steps=3",
    "--set",
    "optimizer.learning_rate=0.1",
    "--set",
    "prompt.init=random_uniform",
  )
  assert json.loads(out[-1])["final_step"] == 3


def test_an_empty_prompt_is_refused_for_training(trained, tmp_path, capsys):
  cfg, _ = trained
  msg = _err(capsys, ["train", cfg, "--workdir", tmp_path / "w", "--set", "prompt.length=0"])
  assert "prompt.length 0: training needs a prompt of at least 1 token" in msg
  assert not (tmp_path / "w").exists()
  assert C.load(cfg, ["prompt.length=0"]).prompt.length == 0  # still a valid config (the bare base, evaluated)


def test_inspect_of_a_prefix_tuning_workdir_shows_its_slots(byte_t5, tmp_path, capsys):
  """A key/value table has no vocabulary near it: inspect prints each slot's norms per layer, keys and values."""
  cfg = write_config(byte_t5, tmp_path / "c.yaml", 2)
  w = tmp_path / "w"
  over = ["--set", "prompt.method=prefix_tuning", "--set", "prompt.init=random_uniform"]
  assert main(["train", str(cfg), "--workdir", str(w), "--no-progress", *over]) == 0
  table = load_prompt_source(w).value  # [P, Y, 2, K, D]
  rows = [json.loads(line) for line in run_cli(capsys, "inspect", w)]
  assert [r["index"] for r in rows] == list(range(table.shape[0]))
  np.testing.assert_allclose(
    rows[1]["key_norms"], np.linalg.norm(table[1, :, 0].reshape(table.shape[1], -1), axis=-1), atol=1e-4
  )
  assert (w / "similarity.png").is_file()


def test_export_where_it_cannot_be_written_names_the_path(trained, tmp_path, capsys):
  from jaxprompt.errors import ExportError
  from jaxprompt.prompts.export import export_prompt

  _, w = trained
  (tmp_path / "README.md").write_text("x")
  out = tmp_path / "README.md" / "x"
  msg = _err(capsys, ["export", w, "--format", "peft", "--out", out])
  assert f"cannot write {out}: {tmp_path / 'README.md'} is a file, not a folder" in msg
  msg = _err(capsys, ["export", w, "--format", "numpy", "--out", "/proc/x.npy"])
  assert "cannot write /proc/x" in msg
  with pytest.raises(ExportError, match="is a file, not a folder"):
    export_prompt(w, "safetensors", tmp_path / "README.md" / "p.safetensors")
  with pytest.raises(OSError):  # still the OSError a Python caller catches
    export_prompt(w, "safetensors", tmp_path / "README.md" / "p.safetensors")
  assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_serve_on_a_taken_port_is_one_line_before_loading_anything(tmp_path, capsys):
  pytest.importorskip("uvicorn")
  with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    # a model that does not exist: the port is checked first
    msg = _err(capsys, ["serve", "--model", tmp_path / "nope", "--port", port])
  assert f"--port {port}: 127.0.0.1:{port} is already in use" in msg


def test_set_keeps_strings_literal_and_names_its_own_typos(trained, capsys):
  cfg, _ = trained
  c = C.load(None, ["data.custom.template=review: {text}", "prompt.init_text=yes: no", "data.files.train=a: b"])
  assert c.data.custom.template == "review: {text}" and c.prompt.init_text == "yes: no"
  assert c.data.files == {"train": "a: b"}
  c = C.load(None, ["prompt.init_text='quoted: text'", "model.tokenizer=null", "train.steps=7", "eval.metric=123"])
  assert (c.prompt.init_text, c.model.tokenizer, c.train.steps, c.eval.metric) == ("quoted: text", None, 7, "123")
  msg = _err(capsys, ["train", cfg, "--set", "train.stpes=3"])
  assert msg == "jaxprompt: error: --set train.stpes: unknown config key 'train.stpes' (did you mean 'steps'?)"
  msg = _err(capsys, ["train", cfg, "--set", "data.custom.templat=x"])
  assert "--set data.custom.templat: unknown config key 'data.custom.templat' (did you mean 'template'?)" in msg
  assert "is a value, not a section" in _err(capsys, ["train", cfg, "--set", "train.steps.x=1"])


def test_version_and_generate_flags(capsys):
  from jaxprompt.version import __version__

  with pytest.raises(SystemExit) as e:
    main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.strip() == f"jaxprompt {__version__}"

  def parse(*argv):
    return build_parser().parse_args(["generate", *argv])

  g = _generate_config(parse("--method", "greedy", "--temperature", "0"))
  assert g.method == "greedy"
  assert _generate_config(parse("--method", "beam", "--beams", "2")).num_beams == 2
  with pytest.raises(C.ConfigError, match="generate --method greedy"):
    _generate_config(parse("--temperature", "0"))
  assert _read_inputs(parse("--input", "a", "--input", "b")) == ["a", "b"]
  assert _read_inputs(parse()) == [""]
  with pytest.raises(SystemExit):
    main(["generate", "--help"])
  assert (
    "--method {greedy,sample,beam}" in (text := " ".join(capsys.readouterr().out.split()))
    and "one output per --input" in text
  )


def test_generate_with_several_inputs(byte_t5, capsys):
  out = run_cli(capsys, "generate", "--model", byte_t5, "--input", "1 2", "--input", "3", "--max-new-tokens", "2")
  assert len(out) == 2


def test_generate_with_a_file_whose_rows_do_not_fill_its_template_is_one_line(byte_t5, tmp_path, capsys):
  template = "[P:2] {text} [P:3]"
  np.save(tmp_path / "p.npy", np.zeros((4, 8), np.float32))  # 4 rows for 5 virtual tokens
  (tmp_path / "p.json").write_text(json.dumps({"prompt_spec": {"method": "prompt_tuning", "template": template}}))
  err = _err(capsys, ["generate", "--model", byte_t5, "--prompt", tmp_path / "p.npy", "--input", "1 2"])
  assert f"{tmp_path / 'p.npy'}: holds 4 prompt rows, but its template {template!r} has 5 virtual token slots" in err


def test_eval_of_a_workdir_uses_its_recorded_config(trained, tmp_path, capsys):
  cfg, w = trained
  assert yaml.safe_load((w / "config.yaml").read_text())["prompt"]["length"] == 4
  small = ["--set", "eval.max_examples=8"]
  alone = json.loads(run_cli(capsys, "eval", w, *small)[-1])
  flag = json.loads(run_cli(capsys, "eval", "--workdir", w, *small)[-1])
  old = json.loads(run_cli(capsys, "eval", cfg, "--workdir", w, *small)[-1])
  assert alone == flag == old and alone["step"] == 2
  (tmp_path / "empty").mkdir()
  assert "config.yaml does not exist" in _err(capsys, ["eval", tmp_path / "empty"])
  assert "eval needs WORKDIR" in _err(capsys, ["eval"])


def test_friction_outputs_in_the_workdir_and_a_finished_run_says_so(trained, tmp_path, capsys, caplog):
  """eval's predictions under predictions/ (as training's), inspect's heatmap inside the workdir, a finished run
  run again says so, a PEFT export names a base PyTorch can load, a single workdir is served under its own name."""
  cfg, w0 = trained
  w = tmp_path / "run"
  shutil.copytree(w0, w)
  run_cli(capsys, "eval", w, "--set", "eval.max_examples=8")
  assert (w / "predictions" / "eval_step_2.jsonl").is_file() and not list(w.glob("predictions_eval*"))
  run_cli(capsys, "inspect", w, "--model", yaml.safe_load((w / "config.yaml").read_text())["model"]["path"])
  assert (w / "similarity.png").is_file() and not (tmp_path / "run_similarity.png").exists()
  capsys.readouterr()
  assert main(["train", str(cfg), "--workdir", str(w), "--no-progress"]) == 0
  assert "is already trained to step 2 (train.steps 2): nothing to train" in caplog.text
  run_cli(capsys, "export", w, "--format", "peft", "--out", tmp_path / "peft")
  base = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
  assert base.startswith("/") and (Path(base) / "config.json").is_file()


def test_serving_one_workdir_names_it_after_its_folder_and_warns_once(trained, byte_t5, tmp_path, caplog):
  pytest.importorskip("fastapi")
  import numpy as np

  from jaxprompt.serve.server import build

  _, w = trained
  _, engine, problems = build(str(byte_t5), prompts=str(w))
  assert engine.store.names() == [w.name] and not problems
  folder = tmp_path / "prompts"
  folder.mkdir()
  (folder / "broken.npy").write_bytes(b"not an array")
  np.save(folder / "ok.npy", np.zeros((4, engine.base.hidden_size), np.float32))
  with caplog.at_level("WARNING"):
    _, engine, problems = build(str(byte_t5), prompts=str(folder))
  assert engine.store.names() == ["ok"] and len(problems) == 1 and "broken.npy: skipped" in problems[0]
  assert not [r for r in caplog.records if "skipped" in r.getMessage()]  # the caller prints problems, once


def test_classification_labels_longer_than_target_length_are_refused(trained, capsys):
  cfg, _ = trained
  msg = _err(capsys, ["train", cfg, "--set", "data.target_length=1", "--set", "train.steps=1"])
  assert "data.target_length 1 cuts label" in msg and "set data.target_length to at least 2" in msg


def test_custom_task_files_beside_the_config_label_map_forms_and_missing_columns(tmp_path, monkeypatch):
  from jaxprompt.data import sources
  from jaxprompt.errors import DataError

  (tmp_path / "cfg" / "data").mkdir(parents=True)
  (tmp_path / "cfg" / "data" / "train.txt").write_text(
    "DESC:manner How did serfdom develop ?\nNUM:date When was it ?\nHUM:ind Who ?\n"
  )
  custom = {
    "template": "question: {text}",
    "labels": ["description", "number", "human"],
    "label_map": {"DESC:*": "description", "re:NUM:.*": "number", "HUM:ind": "human"},
  }
  raw = {"data": {"task": "trec", "files": {"train": "data/train.txt"}, "custom": custom}}
  (tmp_path / "cfg" / "c.yaml").write_text(yaml.safe_dump(raw))
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  cfg = C.load(tmp_path / "cfg" / "c.yaml")
  assert cfg.data.files["train"] == str(tmp_path / "cfg" / "data" / "train.txt")
  ex = sources.task_examples(cfg.data, "train").examples
  assert [e["targets"] for e in ex] == ["description", "number", "human"]
  assert ex[0]["inputs"] == "question: How did serfdom develop ?"
  bad = C.load(tmp_path / "cfg" / "c.yaml", ["data.custom.template=question: {txt}"])
  with pytest.raises(DataError, match=r"field 'txt': missing \(the row has label, text\)"):
    sources.task_examples(bad.data, "train")
  with pytest.raises(DataError, match=r"label_map: key 're:\(' is not a regular expression"):
    sources.task_examples(C.load(None, ["data.task=x", "data.custom.label_map={'re:(': a}"]).data, "train")


def test_plan_rows_show_small_sizes_and_the_core_install_is_quiet():
  import logging

  import jaxprompt  # noqa: F401 — installs the filter
  from jaxprompt.tools.plan import PlanRow

  row = PlanRow(dict(data=4, fsdp=1, model=1), "none", 0.002, 0.0001, 0.0, 0.0021, 3.2e8, 1.0)
  assert "args    2.05 MiB" in row.line() and "total    2.15 MiB" in row.line() and "320.00 MFLOP" in row.line()
  banner = logging.LogRecord("transformers", logging.WARNING, "", 0, "PyTorch was not found. Models won't", (), None)
  assert not logging.getLogger("transformers").filter(banner)
