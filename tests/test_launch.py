"""launch/: TPU pod (gcloud) and SLURM launchers, tested through their dry runs and fake gcloud / sbatch / srun.

No network, no gcloud, no SLURM. The strongest checks paste a dry run's output into bash with fakes on PATH: a
fake `gcloud` that runs `--command=TEXT` the way ssh does (`bash -c TEXT` in $HOME), a fake `sbatch` that runs the
script, a fake `srun` that starts its command once per task, and a stub `jaxprompt` that records its argv. A user
argument full of shell syntax must reach the stub byte for byte, through the local shell, gcloud and the remote shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "launch" / "tpu.py"
SLURM = ROOT / "launch" / "slurm.py"

# What a user may type after `--`: quotes, $, backticks, globs, ;, &, |, redirections, =, an empty word, a later
# `--`, a leading dash, a tab, non-ASCII.
AWKWARD = [
  "configs/my config.yaml",
  "--workdir",
  "/shared/runs/a b",
  "--set",
  "train.note=it's a $HOME test",
  "--set",
  'prompt.init_text="positive" or `negative` $(id) ${PATH} ; & | > < * ? [a] ~ \\ !x',
  "--set",
  "data.task=k=v=w",
  "--set",
  "x.tab=a\tb",
  "--set",
  "x.u=é ü 漢",
  "",
  "--",
  "-n",
]
STUB_ENV = ("JAXPROMPT_DISTRIBUTED", "JAX_PLATFORMS", "JAX_LOCAL_DEVICE_IDS", "SLURM_PROCID", "SLURM_LOCALID", "MY_VAR")

JAXPROMPT_STUB = """#!{python}
import json, os, signal, sys, time
out = os.environ["STUB_OUT"]
rec = {{"argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(),
        "env": {{k: os.environ.get(k) for k in {keys!r}}}}}
with open(out, "a") as f:
  f.write(json.dumps(rec) + "\\n")
print("stub: hello from jaxprompt", flush=True)
if os.environ.get("STUB_SLEEP"):
  def term(*_):
    open(out + ".term", "w").write("1")
    sys.exit(75)
  signal.signal(signal.SIGTERM, term)
  open(out + ".ready", "w").write("1")
  time.sleep(30)
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""

# ssh runs `$SHELL -c TEXT` in the remote home; scp `NAME:PATH` is relative to that home.
GCLOUD_FAKE = """#!{python}
import json, os, shutil, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(argv) + "\\n")
home = os.environ["HOME"]
if argv[:3] == ["compute", "tpus", "tpu-vm"] and argv[3] == "ssh":
  cmd = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
  shell = os.environ.get("REMOTE_SHELL", "bash")
  sys.exit(subprocess.run([shell, "-c", cmd], cwd=home).returncode)
if argv[:3] == ["compute", "tpus", "tpu-vm"] and argv[3] == "scp":
  src, dest = [a for a in argv[4:] if not a.startswith("--")]
  assert ":" in dest and ":" not in src, argv
  shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
"""

# Records the install instead of running pip; anything else goes to the real interpreter.
PYTHON3_FAKE = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  printf '%s\\n' "$@" > "$PIP_LOG"
  exit 0
fi
exec {python} "$@"
"""

SBATCH_FAKE = """#!/bin/sh
echo "$@" > "$SBATCH_LOG"
export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='node[001-002]'
exec bash "$1"
"""

# Starts its command once per task (nodes x tasks per node) with the SLURM_* variables srun sets.
SRUN_FAKE = """#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
opts = []
while argv and argv[0].startswith("-"):
  opts.append(argv.pop(0))
with open(os.environ["SRUN_LOG"], "w") as f:
  json.dump(opts, f)
o = dict(a[2:].split("=", 1) for a in opts if a.startswith("--") and "=" in a)
nodes, per = int(o.get("nodes", 1)), int(o.get("ntasks-per-node", 1))
procs = []
for node in range(nodes):
  for local in range(per):
    env = dict(os.environ, SLURM_PROCID=str(node * per + local), SLURM_LOCALID=str(local),
               SLURM_NTASKS=str(nodes * per), SLURM_STEP_NODELIST=os.environ.get("SLURM_JOB_NODELIST", ""))
    procs.append(subprocess.Popen(argv, env=env))
sys.exit(max(p.wait() for p in procs))
"""

SCONTROL_FAKE = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
"""


def _write(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def sandbox(tmp_path):
  """A fake $HOME, a bin/ of fakes first on PATH, and the environment to run commands in."""
  bin_, home = tmp_path / "bin", tmp_path / "home"
  bin_.mkdir()
  home.mkdir()
  py = sys.executable
  _write(bin_ / "jaxprompt", JAXPROMPT_STUB.format(python=py, keys=STUB_ENV))
  _write(bin_ / "gcloud", GCLOUD_FAKE.format(python=py))
  _write(bin_ / "python3", PYTHON3_FAKE.format(python=py))
  _write(bin_ / "sbatch", SBATCH_FAKE)
  _write(bin_ / "srun", SRUN_FAKE.format(python=py))
  _write(bin_ / "scontrol", SCONTROL_FAKE)
  env = {
    "PATH": f"{bin_}:/usr/local/bin:/usr/bin:/bin",
    "HOME": str(home),
    "LANG": "C.UTF-8",
    "STUB_OUT": str(tmp_path / "stub.jsonl"),
    "GCLOUD_LOG": str(tmp_path / "gcloud.jsonl"),
    "PIP_LOG": str(tmp_path / "pip.txt"),
    "SBATCH_LOG": str(tmp_path / "sbatch.txt"),
    "SRUN_LOG": str(tmp_path / "srun.json"),
    "SCONTROL_LOG": str(tmp_path / "scontrol.txt"),
  }
  box = types.SimpleNamespace(tmp=tmp_path, bin=bin_, home=home, env=env, stub_out=Path(env["STUB_OUT"]))
  yield box
  # Stop any detached stub this test started (by the pid it recorded).
  if box.stub_out.exists():
    for rec in _records(box.stub_out):
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(rec["pid"], 15)


def _records(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(path: Path, timeout: float = 15.0) -> None:
  end = time.time() + timeout
  while not path.exists():
    assert time.time() < end, f"timed out waiting for {path}"
    time.sleep(0.05)


def _wait_for_records(path: Path, count: int = 1, timeout: float = 15.0) -> list[dict]:
  """The first `count` whole lines of a JSONL file another process is appending to (it may exist, still empty)."""
  end = time.time() + timeout
  while True:
    text = path.read_text() if path.exists() else ""
    lines = [line for line in text.split("\n")[:-1] if line.strip()]  # a line without its newline is unfinished
    if len(lines) >= count:
      return [json.loads(line) for line in lines]
    assert time.time() < end, f"timed out waiting for {count} record(s) in {path}: {text!r}"
    time.sleep(0.05)


def _launch(script: Path, *args: str, env=None, check: bool = True) -> subprocess.CompletedProcess:
  p = subprocess.run(
    [sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
  )
  if check:
    assert p.returncode == 0, p.stderr
  return p


def _bash(text: str, env, cwd, timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", "-c", text], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _remote_command(line: str) -> str:
  commands = [a for a in shlex.split(line) if a.startswith("--command=")]
  assert len(commands) == 1, line
  return commands[0][len("--command=") :]


POD = ["my-pod", "--zone", "us-central2-b"]
# The detached start uses util-linux `setsid`, as on the TPU VMs (Ubuntu); macOS has none.
needs_setsid = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")


# ------------------------------------------------------------------------------------------------------------ TPU


def test_tpu_dry_run_prints_parseable_gcloud_commands(tmp_path):
  p = _launch(
    TPU,
    "up",
    *POD,
    "--accelerator-type",
    "v4-32",
    "--spot",
    "--project",
    "my proj",
    "--git",
    "https://github.com/example/jaxprompt.git",
    "--ref",
    "v1.0",
    "--dry-run",
    "--",
    *AWKWARD,
  )
  lines = p.stdout.splitlines()
  assert len(lines) == 3, p.stdout  # create, setup, train: one command per line
  assert all(not line.startswith("#") for line in lines)  # notes go to stderr
  for line in lines:
    argv = shlex.split(line)
    assert argv[:3] == ["gcloud", "compute", "tpus"]
    assert "--zone=us-central2-b" in argv and "--project=my proj" in argv
    assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0
  create, setup, train = (shlex.split(line) for line in lines)
  assert create[3:6] == ["tpu-vm", "create", "my-pod"]
  assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(create)
  for argv, line in ((setup, lines[1]), (train, lines[2])):
    assert argv[3:6] == ["tpu-vm", "ssh", "my-pod"] and "--worker=all" in argv
    assert subprocess.run(["bash", "-n", "-c", _remote_command(line)]).returncode == 0
  remote_setup = _remote_command(lines[1])
  assert "git clone --quiet https://github.com/example/jaxprompt.git" in remote_setup
  assert "fetch --quiet origin v1.0" in remote_setup
  assert "pip install --quiet --upgrade 'jax[tpu]' -e \"$HOME\"/jaxprompt" in remote_setup


def test_tpu_queued_resource_and_other_subcommands():
  def run(*a):
    return _launch(TPU, *a, "--dry-run").stdout.splitlines()

  (create,) = (
    shlex.split(line) for line in run("create", *POD, "--accelerator-type", "v5litepod-16", "--queued", "--spot")
  )
  assert create[3:6] == ["queued-resources", "create", "my-pod"]
  assert {
    "--node-id=my-pod",
    "--accelerator-type=v5litepod-16",
    "--runtime-version=v2-alpha-tpuv5-lite",
    "--spot",
  } <= set(create)
  (wait,) = (shlex.split(line) for line in run("wait", *POD, "--queued"))
  assert wait[3:6] == ["queued-resources", "describe", "my-pod"] and "--format=value(state.state)" in wait
  (delete,) = (shlex.split(line) for line in run("delete", *POD, "--queued", "--yes"))
  assert delete[3:6] == ["queued-resources", "delete", "my-pod"] and {"--force", "--quiet"} <= set(delete)
  (delete,) = (shlex.split(line) for line in run("delete", *POD))
  assert delete[3:6] == ["tpu-vm", "delete", "my-pod"] and "--quiet" not in delete  # gcloud asks first
  mkdir, scp = (shlex.split(line) for line in run("fetch-logs", *POD, "--dest", "out/logs"))
  assert mkdir == ["mkdir", "-p", "out/logs"]
  assert scp[3:8] == ["tpu-vm", "scp", "my-pod:jaxprompt-logs/*", "out/logs/", "--worker=all"]
  for sub, extra in (("logs", []), ("logs", ["--follow", "--worker", "0"]), ("stop", [])):
    (line,) = run(sub, *POD, *extra)
    assert subprocess.run(["bash", "-n", "-c", _remote_command(line)]).returncode == 0


@needs_setsid
@pytest.mark.parametrize("remote_shell", ["bash", "dash"])
def test_tpu_train_dry_run_pasted_into_bash_delivers_arguments_intact(sandbox, remote_shell):
  """The dry run's line, pasted into a local bash; the fake gcloud runs --command as ssh would (the login shell:
  bash on TPU VMs; dash shows the detached start is plain POSIX sh)."""
  if shutil.which(remote_shell) is None:
    pytest.skip(f"{remote_shell} not installed")
  (sandbox.home / "jaxprompt").mkdir()  # the source tree setup would have made
  p = _launch(TPU, "train", *POD, "--env", "MY_VAR=a 'b' $c", "--dry-run", "--", *AWKWARD)
  (line,) = p.stdout.splitlines()
  r = _bash(line, dict(sandbox.env, REMOTE_SHELL=remote_shell), sandbox.tmp)
  assert r.returncode == 0, r.stderr
  assert "started pid" in r.stdout
  (rec,) = _wait_for_records(sandbox.stub_out)
  assert rec["argv"] == ["train", *AWKWARD]
  assert rec["env"]["JAXPROMPT_DISTRIBUTED"] == "auto" and rec["env"]["JAX_PLATFORMS"] == "tpu"
  assert rec["env"]["MY_VAR"] == "a 'b' $c"
  assert rec["cwd"] == str(sandbox.home / "jaxprompt")
  logs = sandbox.home / "jaxprompt-logs"
  (pidfile,) = logs.glob("train-*.pid")
  assert int(pidfile.read_text()) == rec["pid"]  # `stop` signals the right process
  (log,) = logs.glob("train-*.log")
  end = time.time() + 10
  while "stub: hello" not in log.read_text():
    assert time.time() < end, log.read_text()
    time.sleep(0.05)
  assert log.read_text().startswith("== ")


@needs_setsid
def test_tpu_stop_sends_sigterm_and_refuses_a_second_start(sandbox):
  env = dict(sandbox.env, STUB_SLEEP="1")
  (line,) = _launch(TPU, "train", *POD, "--dry-run", "--", "c.yaml").stdout.splitlines()
  assert _bash(line, env, sandbox.tmp).returncode == 0
  _wait_for(Path(str(sandbox.stub_out) + ".ready"))
  again = _bash(line, env, sandbox.tmp)
  assert again.returncode == 1 and "already running" in again.stderr
  (stop,) = _launch(TPU, "stop", *POD, "--dry-run").stdout.splitlines()
  r = _bash(stop, env, sandbox.tmp)
  assert r.returncode == 0 and "sent SIGTERM" in r.stdout, r.stdout + r.stderr
  _wait_for(Path(str(sandbox.stub_out) + ".term"))


def test_tpu_attached_run_through_gcloud_keeps_exit_status(sandbox):
  """Not a dry run: tpu.py itself runs the (fake) gcloud; --attach streams output and returns the run's status."""
  env = dict(sandbox.env, STUB_EXIT="3")
  p = _launch(
    TPU, "train", *POD, "--attach", "--program", f"{sandbox.bin / 'jaxprompt'}", "--", *AWKWARD, env=env, check=False
  )
  assert p.returncode == 3, p.stderr
  assert "stub: hello from jaxprompt" in p.stdout
  (rec,) = _records(sandbox.stub_out)
  assert rec["argv"] == ["train", *AWKWARD]
  (gcloud_argv,) = _records(Path(sandbox.env["GCLOUD_LOG"]))
  assert gcloud_argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in gcloud_argv
  (log,) = (sandbox.home / "jaxprompt-logs").glob("train-*.log")
  assert "stub: hello from jaxprompt" in log.read_text()


def test_tpu_exec_runs_any_command_in_the_source_tree(sandbox):
  (sandbox.home / "jaxprompt").mkdir()
  p = _launch(
    TPU, "exec", *POD, "--worker", "0", "--env", "MY_VAR=$x y", "--dry-run", "--", "jaxprompt", "eval", *AWKWARD
  )
  (line,) = p.stdout.splitlines()
  assert "--worker=0" in shlex.split(line)
  r = _bash(line, sandbox.env, sandbox.tmp)
  assert r.returncode == 0, r.stderr
  (rec,) = _records(sandbox.stub_out)
  assert rec["argv"] == ["eval", *AWKWARD] and rec["env"]["MY_VAR"] == "$x y"
  assert rec["cwd"] == str(sandbox.home / "jaxprompt")


def test_tpu_setup_copy_ships_the_tree_and_installs(sandbox):
  src = sandbox.tmp / "src tree"
  (src / "jaxprompt").mkdir(parents=True)
  (src / "pyproject.toml").write_text("[project]\n")
  (src / "jaxprompt" / "__init__.py").write_text("")
  (src / ".git").mkdir()
  (src / ".git" / "HEAD").write_text("ref")
  (src / "runs").mkdir()
  (src / "runs" / "big.bin").write_text("x")
  (sandbox.home / "jaxprompt").mkdir()
  (sandbox.home / "jaxprompt" / "stale.py").write_text("")  # from an older copy: must not survive
  p = _launch(TPU, "setup", *POD, "--copy", str(src), "--dry-run")
  tar, scp, rm, ssh = p.stdout.splitlines()
  archive = shlex.split(tar)[2]
  assert shlex.split(rm) == ["rm", "-f", archive]
  assert shlex.split(scp)[3:5] == ["tpu-vm", "scp"] and "--worker=all" in shlex.split(scp)
  assert "--worker=all" in shlex.split(ssh)
  r = _bash(p.stdout, sandbox.env, sandbox.tmp)
  assert r.returncode == 0, r.stderr
  assert "jaxprompt installed on" in r.stdout
  tree = sandbox.home / "jaxprompt"
  assert (tree / "pyproject.toml").exists() and (tree / "jaxprompt" / "__init__.py").exists()
  assert not (tree / ".git").exists() and not (tree / "runs").exists() and not (tree / "stale.py").exists()
  assert not (sandbox.home / "jaxprompt-src.tar.gz").exists() and not Path(archive).exists()
  pip = Path(sandbox.env["PIP_LOG"]).read_text().splitlines()
  assert pip == ["-m", "pip", "install", "--quiet", "--upgrade", "jax[tpu]", "-e", str(tree)]


def test_tpu_refuses_what_would_go_wrong_remotely():
  p = _launch(TPU, "train", *POD, "--dry-run", "--", "c.yaml", "--workdir", "gs://bucket/run", check=False)
  assert p.returncode == 2 and "gs://" in p.stderr and p.stdout == ""
  assert _launch(TPU, "train", *POD, "--dry-run", "--allow-gs-workdir", "--", "c.yaml", "--workdir=gs://b/r").stdout
  p = _launch(TPU, "train", *POD, "--dry-run", check=False)
  assert p.returncode == 2 and "after `--`" in p.stderr
  for bad in ("", ".", "~", "/", "../x"):  # setup replaces --remote-dir: never $HOME or /
    p = _launch(TPU, "setup", *POD, "--copy", ".", "--remote-dir", bad, "--dry-run", check=False)
    assert p.returncode == 2 and "--remote-dir" in p.stderr, bad
  p = _launch(TPU, "train", *POD, "--env", "1BAD=x", "--dry-run", "--", "c.yaml", check=False)
  assert p.returncode == 2 and "NAME=VALUE" in p.stderr


# ---------------------------------------------------------------------------------------------------------- SLURM


def _split_heredoc(text: str) -> tuple[str, str, list[str]]:
  lines = text.splitlines()
  assert lines[0].startswith("cat > ") and lines[0].endswith("<<'JAXPROMPT_SBATCH_EOF'")
  end = lines.index("JAXPROMPT_SBATCH_EOF")
  return lines[0], "\n".join(lines[1:end]) + "\n", lines[end + 1 :]


def test_slurm_dry_run_script_and_command(tmp_path):
  p = _launch(
    SLURM,
    "--nodes",
    "2",
    "--gpus-per-node",
    "8",
    "--partition",
    "gpu",
    "--time",
    "12:00:00",
    "--cpus-per-task",
    "32",
    "--setup",
    "module load cuda/12.4",
    "--job-name",
    "rte base",
    "--dry-run",
    "--",
    *AWKWARD,
  )
  assert subprocess.run(["bash", "-n", "-c", p.stdout]).returncode == 0
  head, script, tail = _split_heredoc(p.stdout)
  assert shlex.split(head)[:3] == ["cat", ">", "rte base.sbatch"]
  assert [shlex.split(line) for line in tail] == [["sbatch", "rte base.sbatch"]]
  (tmp_path / "job.sbatch").write_text(script)
  assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
  lines = script.splitlines()
  assert lines[0] == "#!/bin/bash"
  directives = [line.split(" ", 1)[1] for line in lines if line.startswith("#SBATCH ")]
  assert {
    "--nodes=2",
    "--ntasks-per-node=1",
    "--gpus-per-node=8",
    "--partition=gpu",
    "--time=12:00:00",
    "--cpus-per-task=32",
    "--job-name=rte base",
    "--signal=TERM@120",
  } <= set(directives)
  # sbatch stops reading directives at the first command: all of them come first.
  first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
  assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#SBATCH"))
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines and "export JAXPROMPT_DISTRIBUTED=auto" in lines
  (srun_line,) = [line for line in lines if line.startswith("srun ")]
  srun = shlex.split(srun_line)
  assert "--cpus-per-task=32" in srun and "--nodes=2" in srun
  assert srun[srun.index("jaxprompt") :][: 2 + len(AWKWARD)] == ["jaxprompt", "train", *AWKWARD]


@pytest.mark.parametrize("per,tasks", [("node", 2), ("gpu", 8)])
def test_slurm_dry_run_pasted_into_bash_runs_every_process_with_intact_arguments(sandbox, per, tasks):
  p = _launch(
    SLURM,
    "--nodes",
    "2",
    "--gpus-per-node",
    "4",
    "--per",
    per,
    "--env",
    "MY_VAR=a 'b' $c",
    "--setup",
    'export SETUP_RAN="yes $HOME"',
    "--dry-run",
    "--",
    *AWKWARD,
  )
  r = _bash(p.stdout, sandbox.env, sandbox.tmp)
  assert r.returncode == 0, r.stdout + r.stderr
  assert (sandbox.tmp / "jaxprompt.sbatch").exists()
  assert Path(sandbox.env["SBATCH_LOG"]).read_text().split() == ["jaxprompt.sbatch"]
  recs = _records(sandbox.stub_out)
  assert len(recs) == tasks
  assert sorted(int(r["env"]["SLURM_PROCID"]) for r in recs) == list(range(tasks))
  for rec in recs:
    assert rec["argv"] == ["train", *AWKWARD]
    assert rec["env"]["JAXPROMPT_DISTRIBUTED"] == "auto" and rec["env"]["MY_VAR"] == "a 'b' $c"
    # one process per node drives all its GPUs; one per GPU lets JAX pick GPU SLURM_LOCALID
    assert rec["env"]["JAX_LOCAL_DEVICE_IDS"] == ("0,1,2,3" if per == "node" else None)
  srun_opts = json.loads(Path(sandbox.env["SRUN_LOG"]).read_text())
  assert ("--gpu-bind=none" in srun_opts) == (per == "gpu")


def test_slurm_requeues_after_a_checkpointed_stop(sandbox):
  """Exit 75 (SIGTERM before the time limit, checkpoint written): the job requeues itself and resumes."""
  env = dict(sandbox.env, STUB_EXIT="75")
  p = _launch(SLURM, "--nodes", "2", "--requeue", "--dry-run", "--", "c.yaml")
  _, script, _ = _split_heredoc(p.stdout)
  assert "#SBATCH --requeue" in script and "#SBATCH --open-mode=append" in script
  r = _bash(p.stdout, env, sandbox.tmp)
  assert r.returncode == 75
  assert Path(sandbox.env["SCONTROL_LOG"]).read_text().split() == ["requeue", "4242"]


def test_slurm_submits_through_sbatch(sandbox):
  """Not a dry run: writes the script where asked and calls sbatch on it; the exit status comes back."""
  env = dict(sandbox.env, STUB_EXIT="4")
  script = sandbox.tmp / "jobs" / "x.sbatch"
  p = _launch(
    SLURM,
    "--nodes",
    "2",
    "--script",
    str(script),
    "--sbatch",
    str(sandbox.bin / "sbatch"),
    "--",
    *AWKWARD,
    env=env,
    check=False,
  )
  assert p.returncode == 4, p.stderr
  assert script.exists() and os.access(script, os.X_OK)
  assert [r["argv"] for r in _records(sandbox.stub_out)] == [["train", *AWKWARD]] * 2
  assert not Path(sandbox.env["SCONTROL_LOG"]).exists()  # no requeue unless asked


def test_slurm_rejects_bad_input():
  p = _launch(SLURM, "--dry-run", check=False)
  assert p.returncode == 2 and "after `--`" in p.stderr
  p = _launch(SLURM, "--setup", "a\nb", "--dry-run", "--", "c.yaml", check=False)
  assert p.returncode == 2 and "one line" in p.stderr
  p = _launch(SLURM, "--env", "X", "--dry-run", "--", "c.yaml", check=False)
  assert p.returncode == 2 and "NAME=VALUE" in p.stderr


def test_launch_scripts_have_help():
  for script in (TPU, SLURM):
    assert "usage:" in _launch(script, "--help").stdout
  for sub in ("create", "setup", "train", "up", "logs", "fetch-logs", "stop", "exec", "delete", "wait"):
    assert "usage:" in _launch(TPU, sub, "--help").stdout
