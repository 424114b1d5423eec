"""Off the happy path (issue 28): what used to end in a traceback (or did the unexpected) is one line and exit 2, or
does what a user means: reusing a workdir with another prompt or optimizer, an empty prompt, outputs where they
cannot go, a taken port, --set values and typos, generate's flags, eval of a workdir alone."""

import json
import shutil
import socket

import pytest
import yaml

from jaxprompt import config as C
from jaxprompt.cli import EXIT_USER_ERROR, _generate_config, _read_inputs, build_parser, main
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


def test_inspect_of_a_prefix_tuning_workdir_is_one_line(byte_t5, tmp_path, capsys):
  cfg = write_config(byte_t5, tmp_path / "c.yaml", 2)
  w = tmp_path / "w"
  over = ["--set", "prompt.method=prefix_tuning", "--set", "prompt.init=random_uniform"]
  assert main(["train", str(cfg), "--workdir", str(w), "--no-progress", *over]) == 0
  msg = _err(capsys, ["inspect", w])
  assert "a prefix_tuning prompt is" in msg and "not input embeddings" in msg


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
