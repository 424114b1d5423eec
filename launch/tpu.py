#!/usr/bin/env python3
"""Cloud TPU VM pods through `gcloud`: create, set up, train (one command on every worker), logs, stop, delete.

    python launch/tpu.py up NAME --zone us-central2-b --accelerator-type v4-32 --git URL \\
        -- configs/paper/t5-base-lm-adapt.yaml --workdir /mnt/shared/runs/rte --set data.task=rte

Everything after `--` is handed, word for word, to `jaxprompt train` on every worker. `--dry-run` prints the exact
commands instead of running them, one per line, quoted so that pasting them into a POSIX shell runs the same thing.

Quoting. A user argument crosses three parsers: the local shell (which hands this script its argv), gcloud (which
hands `--command=TEXT` unchanged to ssh, which sends TEXT to the worker) and the worker's login shell (which parses
TEXT). So the remote TEXT is built from argv lists with `shlex.join` (each word single-quoted where needed), gcloud
is run from an argv list (no local shell involved), and the dry run prints that argv list with `shlex.join` again.
No layer ever sees an unquoted `$`, quote, space or `;` that came from a user.

Standard library only (Python >= 3.8): this runs on a laptop with nothing but gcloud installed.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

# `gcloud compute tpus tpu-vm versions list` has them all; these are the documented choices for JAX.
DEFAULT_RUNTIME = {
  "v6e": "v2-alpha-tpuv6e",
  "v5p": "v2-alpha-tpuv5",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5e": "v2-alpha-tpuv5-lite",
  "v4": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v2": "tpu-ubuntu2204-base",
}
# Source trees copied with --copy leave these behind.
COPY_EXCLUDES = (".git", "runs", ".jax_cache", "__pycache__", "*.egg-info", ".pytest_cache", ".venv", "venv")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Paths that also travel inside scp's `NAME:PATH` (parsed again remotely), so no shell syntax in them.
PLAIN_PATH = re.compile(r"[A-Za-z0-9_./@%+=,:-]+\Z")


class LaunchError(Exception):
  """A usage error: one line on stderr, exit status 2."""


# ---------------------------------------------------------------------------------------------------------- helpers


def remote_path(path: str) -> str:
  """Shell text for a path on a worker; a relative path (or ~/...) is taken from $HOME, whatever the cwd."""
  if path.startswith("~/"):
    path = path[2:]
  if path.startswith("/"):
    return shlex.quote(path)
  return '"$HOME"/' + shlex.quote(path)


def checked_dir(path: str, what: str) -> str:
  """A folder that setup may replace: never $HOME, / or anything above them."""
  norm = posixpath.normpath(path[2:] if path.startswith("~/") else path)
  if norm in (".", "/", "..", "~") or norm.startswith("../") or not path.strip():
    raise LaunchError(f"{what} {path!r}: name a folder below $HOME (or an absolute folder), not $HOME or /")
  return path


def plain_path(path: str, what: str) -> str:
  if not PLAIN_PATH.match(path):
    raise LaunchError(f"{what} {path!r}: use letters, digits and ._/@%+=,:- only (it is parsed again remotely)")
  return path[2:] if path.startswith("~/") else path


def parse_env(pairs: list[str], defaults: dict[str, str]) -> dict[str, str]:
  env = dict(defaults)
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not ENV_NAME.match(key):
      raise LaunchError(f"--env {pair!r}: expected NAME=VALUE")
    env[key] = value
  return env


def env_argv(env: dict[str, str]) -> list[str]:
  """`env K=V ...`: assignments as words, so a value is quoted like any other argument."""
  return ["env", *(f"{k}={v}" for k, v in env.items())] if env else []


def path_export(venv: str | None) -> str:
  # pip installs into ~/.local when site-packages is not writable; ssh's non-login shell leaves it off PATH.
  venv_bin = remote_path(venv) + "/bin:" if venv else ""
  return f'export PATH={venv_bin}"$HOME/.local/bin:$PATH"'


def cd_repo(repo: str) -> str:
  # `--pip` installs leave no source tree; the command then runs from $HOME.
  r = remote_path(repo)
  return f"if [ -d {r} ]; then cd {r}; fi"


def workdir_of(train_args: list[str]) -> str | None:
  for i, a in enumerate(train_args):
    if a == "--workdir" and i + 1 < len(train_args):
      return train_args[i + 1]
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
  return None


def runtime_for(accelerator: str) -> str:
  family = accelerator.split("-", 1)[0]
  if family not in DEFAULT_RUNTIME:
    raise LaunchError(
      f"no default --version for accelerator type {accelerator!r}; pass --version "
      "(see `gcloud compute tpus tpu-vm versions list`)"
    )
  return DEFAULT_RUNTIME[family]


# ---------------------------------------------------------------------------------------------------- gcloud argv


class Gcloud:
  """Builds gcloud argv lists for one TPU VM (or queued resource) in one zone."""

  def __init__(self, args):
    self.exe, self.name, self.zone, self.project = args.gcloud, args.name, args.zone, args.project
    self.internal_ip = getattr(args, "internal_ip", False)

  def _scope(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def tpu_vm(self, verb: str, *rest: str) -> list[str]:
    return [self.exe, "compute", "tpus", "tpu-vm", verb, *rest, *self._scope()]

  def queued(self, verb: str, *rest: str) -> list[str]:
    return [self.exe, "compute", "tpus", "queued-resources", verb, *rest, *self._scope()]

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    # `--command=TEXT` in one word: a TEXT starting with `-` can never be taken for a gcloud flag.
    return self.tpu_vm(
      "ssh", self.name, f"--worker={worker}", *(["--internal-ip"] if self.internal_ip else []), f"--command={command}"
    )

  def scp(self, src: str, dest: str, worker: str = "all") -> list[str]:
    return self.tpu_vm("scp", src, dest, f"--worker={worker}", *(["--internal-ip"] if self.internal_ip else []))


# ------------------------------------------------------------------------------------------------------ the steps
class Step(NamedTuple):
  argv: list[str]
  note: str | None = None  # printed to stderr, never to the dry run's stdout
  wait: bool = False  # poll argv until the queued resource is ACTIVE


def step_create(args) -> list[Step]:
  g = Gcloud(args)
  version = args.version or runtime_for(args.accelerator_type)
  extra = list(args.create_arg)
  if args.queued:
    argv = g.queued(
      "create",
      args.qr_id or args.name,
      f"--node-id={args.name}",
      f"--accelerator-type={args.accelerator_type}",
      f"--runtime-version={version}",
      *(["--spot"] if args.spot else []),
      *extra,
    )
  else:
    argv = g.tpu_vm(
      "create",
      args.name,
      f"--accelerator-type={args.accelerator_type}",
      f"--version={version}",
      *(["--spot"] if args.spot else []),
      *(["--preemptible"] if args.preemptible else []),
      *extra,
    )
  return [Step(argv)]


def step_wait(args) -> list[Step]:
  if not args.queued:
    return []
  argv = Gcloud(args).queued("describe", args.qr_id or args.name, "--format=value(state.state)")
  return [Step(argv, "wait: repeated every 30 s until the queued resource is ACTIVE", wait=True)]


def step_setup(args) -> list[Step]:
  g = Gcloud(args)
  repo = remote_path(checked_dir(args.remote_dir, "--remote-dir"))
  steps, lines = [], ["set -e", path_export(args.venv)]
  if args.venv:
    v = remote_path(args.venv)
    lines.append(f"if [ ! -x {v}/bin/python ]; then python3 -m venv {v}; fi")
  if args.git:
    git = f"git -C {repo}"
    lines += [
      f"if [ ! -d {repo}/.git ]; then git clone --quiet {shlex.quote(args.git)} {repo}; fi",
      f"{git} fetch --quiet origin {shlex.quote(args.ref)}",
      f"{git} checkout --quiet --detach FETCH_HEAD",
    ]
    target = ["-e", None]
  elif args.copy:
    src = os.path.abspath(args.copy)
    if not os.path.isdir(src):
      raise LaunchError(f"--copy {args.copy!r}: not a directory")
    archive = os.path.join(tempfile.gettempdir(), f"jaxprompt-src-{args.name}.tar.gz")
    remote_archive = "jaxprompt-src.tar.gz"
    steps.append(
      Step(["tar", "-czf", archive, *(f"--exclude={x}" for x in COPY_EXCLUDES), "-C", src, "."], f"setup: pack {src}")
    )
    steps.append(Step(g.scp(archive, f"{args.name}:{remote_archive}"), "setup: copy the source tree to every worker"))
    steps.append(Step(["rm", "-f", archive], "setup: remove the local archive"))
    ra = remote_path(remote_archive)
    # A fresh tree each time (files deleted locally must not survive remotely); checked_dir guards the rm.
    lines += [f"rm -rf {repo}", f"mkdir -p {repo}", f"tar -xzf {ra} -C {repo}", f"rm -f {ra}"]
    target = ["-e", None]
  else:
    target = [args.pip]
  pip = ["python3", "-m", "pip", "install", "--quiet", "--upgrade", *args.pip_arg]
  if args.jax_spec:
    pip.append(args.jax_spec)
  words = shlex.join(pip) + " " + " ".join(repo if t is None else shlex.quote(t) for t in target)
  lines += [words, "jaxprompt --help > /dev/null", 'echo "jaxprompt installed on $(hostname)"']
  steps.append(Step(g.ssh("; ".join(lines)), "setup: install on every worker"))
  return steps


def train_command(args) -> str:
  """The remote shell TEXT that starts `jaxprompt train ...` on one worker."""
  if not args.train_args:
    raise LaunchError(
      "nothing to train: put the `jaxprompt train` arguments after `--` "
      "(e.g. -- configs/x.yaml --workdir /mnt/shared/runs/x)"
    )
  workdir = workdir_of(args.train_args)
  if workdir and workdir.startswith("gs://") and not args.allow_gs_workdir:
    raise LaunchError(
      f"--workdir {workdir}: jaxprompt writes its workdir through local paths, so every worker "
      "would write a local directory 'gs:/...'; use a filesystem all workers share (a gcsfuse "
      "mount or Filestore NFS, see launch/README.md), or --allow-gs-workdir if your jaxprompt "
      "version reads gs:// itself"
    )
  # multi-host: jaxprompt calls jax.distributed.initialize() with no arguments, which finds the TPU pod itself;
  # JAX_PLATFORMS=tpu turns a broken libtpu install into an error instead of a slow run on CPU.
  env = parse_env(args.env, {"JAXPROMPT_DISTRIBUTED": "auto", "JAX_PLATFORMS": "tpu"})
  argv = env_argv(env) + shlex.split(args.program) + ["train", *args.train_args]
  logdir, job = remote_path(args.log_dir), shlex.quote(args.job)
  # `set -- ARGV` once, then "$@": the user's words are quoted exactly once in the remote TEXT.
  lines = [
    "set -e" + (" -o pipefail" if args.attach else ""),
    path_export(args.venv),
    f"mkdir -p {logdir}",
    cd_repo(args.remote_dir),
    f'log={logdir}/{job}-"$(hostname)".log',
    f'pidfile={logdir}/{job}-"$(hostname)".pid',
    "set -- " + shlex.join(argv),
    'echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): $*" >> "$log"',
  ]
  if args.attach:
    lines.append('"$@" < /dev/null 2>&1 | tee -a "$log"')
  else:
    # setsid + nohup + no terminal: the run survives the ssh session (and a laptop going to sleep).
    lines += [
      'if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2> /dev/null; then '
      'echo "$(hostname): already running (pid $(cat "$pidfile")); stop it first" >&2; exit 1; fi',
      'nohup setsid "$@" >> "$log" 2>&1 < /dev/null & echo $! > "$pidfile"',
      'echo "$(hostname): started pid $(cat "$pidfile"), log $log"',
    ]
  return "; ".join(lines)


def step_train(args) -> list[Step]:
  return [Step(Gcloud(args).ssh(train_command(args)), "train: the same command on every worker")]


def step_logs(args) -> list[Step]:
  logdir, job = remote_path(args.log_dir), shlex.quote(args.job)
  n = int(args.lines)
  cmd = f'tail -n {n} -F {logdir}/{job}-"$(hostname)".log' if args.follow else f"tail -n {n} {logdir}/{job}-*.log"
  return [Step(Gcloud(args).ssh(cmd, worker=args.worker))]


def step_fetch_logs(args) -> list[Step]:
  logdir = plain_path(args.log_dir, "--log-dir")
  dest = args.dest or os.path.join("logs", args.name)
  # One local folder made first: the workers' copies land in it side by side (each log is named by its host).
  return [
    Step(["mkdir", "-p", dest]),
    Step(Gcloud(args).scp(f"{args.name}:{logdir}/*", dest + "/", worker=args.worker)),
  ]


def step_stop(args) -> list[Step]:
  logdir, job = remote_path(args.log_dir), shlex.quote(args.job)
  cmd = (
    f'pidfile={logdir}/{job}-"$(hostname)".pid; '
    'if [ -f "$pidfile" ] && kill -TERM "$(cat "$pidfile")" 2> /dev/null; then '
    'echo "$(hostname): sent SIGTERM (jaxprompt writes a checkpoint and exits 75)"; '
    'else echo "$(hostname): not running"; fi'
  )
  return [Step(Gcloud(args).ssh(cmd))]


def step_exec(args) -> list[Step]:
  if not args.train_args:
    raise LaunchError("nothing to run: put the command after `--`")
  env = parse_env(args.env, {})
  cmd = "; ".join([path_export(args.venv), cd_repo(args.remote_dir), shlex.join(env_argv(env) + args.train_args)])
  return [Step(Gcloud(args).ssh(cmd, worker=args.worker))]


def step_delete(args) -> list[Step]:
  g = Gcloud(args)
  quiet = ["--quiet"] if args.yes else []
  if args.queued:  # --force: delete the TPU VM it holds, too
    return [Step(g.queued("delete", args.qr_id or args.name, "--force", *quiet))]
  return [Step(g.tpu_vm("delete", args.name, *quiet))]


def step_up(args) -> list[Step]:
  return step_create(args) + step_wait(args) + step_setup(args) + step_train(args)


# ----------------------------------------------------------------------------------------------------- execution


def wait_active(argv: list[str], poll_s: float = 30.0) -> int:
  while True:
    p = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
      return p.returncode
    state = p.stdout.strip()
    print(f"queued resource: {state}", file=sys.stderr)
    if state == "ACTIVE":
      return 0
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      return 1
    time.sleep(poll_s)


def execute(steps: list[Step], dry_run: bool) -> int:
  for argv, note, wait in steps:
    if note:
      print(f"# {note}", file=sys.stderr)
    if dry_run:
      print(shlex.join(argv))
      continue
    print("+ " + shlex.join(argv), file=sys.stderr)
    rc = wait_active(argv) if wait else subprocess.run(argv).returncode
    if rc != 0:
      print(f"tpu.py: command failed with exit status {rc}", file=sys.stderr)
      return rc
  return 0


# ------------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU VM name (the queued resource's node id with --queued)")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b")
  common.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  common.add_argument("--gcloud", default="gcloud", help="gcloud executable")
  common.add_argument("--internal-ip", action="store_true", help="ssh/scp over internal IPs (from inside the VPC)")

  queued = argparse.ArgumentParser(add_help=False)
  queued.add_argument("--queued", action="store_true", help="a queued resource instead of a direct TPU VM")
  queued.add_argument("--qr-id", help="queued resource id (default: NAME)")

  create = argparse.ArgumentParser(add_help=False)
  create.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5litepod-16, v6e-8")
  create.add_argument("--version", help="TPU runtime (default: the documented one for the TPU generation)")
  create.add_argument("--spot", action="store_true", help="Spot TPU (cheap; preempted runs resume on rerun)")
  create.add_argument("--preemptible", action="store_true", help="preemptible TPU (older than --spot)")
  create.add_argument(
    "--create-arg",
    action="append",
    default=[],
    metavar="FLAG",
    help="extra gcloud create flag, e.g. --create-arg=--network=my-net (repeatable)",
  )

  paths = argparse.ArgumentParser(add_help=False)
  paths.add_argument("--remote-dir", default="jaxprompt", help="source tree on the workers (relative: to $HOME)")
  paths.add_argument("--venv", help="a virtualenv on the workers (created by setup), e.g. jaxprompt-venv")
  paths.add_argument("--log-dir", default="jaxprompt-logs", help="log folder on the workers (relative: to $HOME)")
  paths.add_argument("--job", default="train", help="log and pid file prefix (one run at a time per prefix)")

  setup = argparse.ArgumentParser(add_help=False)
  src = setup.add_mutually_exclusive_group(required=True)
  src.add_argument("--git", metavar="URL", help="clone this repository on every worker")
  src.add_argument("--copy", metavar="DIR", help="copy this local source tree to every worker")
  src.add_argument("--pip", metavar="SPEC", help="pip install this, e.g. 'jaxprompt[torch] @ git+https://...'")
  setup.add_argument("--ref", default="HEAD", help="with --git: branch, tag or commit (default: the remote's HEAD)")
  setup.add_argument("--jax-spec", default="jax[tpu]", help="the JAX requirement installed with it ('' for none)")
  setup.add_argument("--pip-arg", action="append", default=[], help="extra pip install argument (repeatable)")

  train = argparse.ArgumentParser(add_help=False)
  train.add_argument("--program", default="jaxprompt", help="the command run on the workers, before `train`")
  train.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="NAME=VALUE",
    help="environment for the run (repeatable; JAXPROMPT_DISTRIBUTED=auto and JAX_PLATFORMS=tpu "
    "are set unless overridden)",
  )
  train.add_argument(
    "--attach", action="store_true", help="stay connected and stream the output (default: start detached, see `logs`)"
  )
  train.add_argument("--allow-gs-workdir", action="store_true", help="pass a gs:// --workdir through")

  p = argparse.ArgumentParser(
    prog="tpu.py",
    description=__doc__.split("\n\n")[0],
    epilog="`jaxprompt train` arguments go after `--`; see launch/README.md.",
  )
  sub = p.add_subparsers(dest="cmd", required=True)

  def add(name, parents, fn, help_):
    s = sub.add_parser(name, parents=parents, help=help_, description=help_)
    s.set_defaults(fn=fn)
    return s

  add("create", [common, queued, create], step_create, "create the TPU VM (or queue a request for it)")
  add("wait", [common, queued], step_wait, "wait until a queued resource is ACTIVE")
  add("setup", [common, paths, setup], step_setup, "install jaxprompt and jax[tpu] on every worker")
  add("train", [common, paths, train], step_train, "start `jaxprompt train ARGS...` on every worker")
  add("up", [common, queued, create, paths, setup, train], step_up, "create + wait + setup + train")
  s = add("logs", [common, paths], step_logs, "show the end of each worker's log")
  s.add_argument("--worker", default="all", help="all (default) or a worker number")
  s.add_argument("--lines", default=50, type=int)
  s.add_argument("--follow", action="store_true", help="keep following (use with --worker=0)")
  s = add("fetch-logs", [common, paths], step_fetch_logs, "copy every worker's log here")
  s.add_argument("--dest", help="local folder (default: logs/NAME)")
  s.add_argument("--worker", default="all")
  add("stop", [common, paths], step_stop, "SIGTERM the run on every worker (it checkpoints and exits 75)")
  s = add("exec", [common, paths], step_exec, "run any command (after `--`) in the source tree on the workers")
  s.add_argument("--worker", default="all")
  s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
  s = add("delete", [common, queued], step_delete, "delete the TPU VM (or the queued resource and its VM)")
  s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Everything after the first `--` belongs to the remote command, untouched by argparse.
  rest: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, rest = argv[:i], argv[i + 1 :]
  args = build_parser().parse_args(argv)
  args.train_args = rest
  if rest and args.cmd not in ("train", "up", "exec"):
    print(f"tpu.py {args.cmd}: takes no arguments after `--`", file=sys.stderr)
    return 2
  try:
    steps = args.fn(args)
  except LaunchError as e:
    print(f"tpu.py {args.cmd}: error: {e}", file=sys.stderr)
    return 2
  return execute(steps, args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
