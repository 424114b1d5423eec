"""Seconds per test file from a `pytest --durations=0` log -> tests/file_seconds.json (the order
tests/conftest.py hands files to the xdist workers: heaviest first).

  python -m pytest -q -n 2 --dist loadfile --durations=0 > LOG; python .ci/file_seconds.py LOG
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s (?:call|setup|teardown)\s+(tests/[^:\s]+\.py)")


def main(log: str) -> None:
  seconds: dict[str, float] = defaultdict(float)
  for line in Path(log).read_text().splitlines():
    if m := LINE.match(line):
      seconds[m.group(2)] += float(m.group(1))
  if not seconds:
    sys.exit(f"{log}: no '--durations=0' lines found")
  out = Path(__file__).resolve().parent.parent / "tests" / "file_seconds.json"
  ordered = dict(sorted(((k, round(v, 1)) for k, v in seconds.items()), key=lambda kv: -kv[1]))
  tmp = out.with_suffix(".tmp")
  tmp.write_text(json.dumps(ordered, indent=1) + "\n")
  tmp.replace(out)
  print(f"{out}: {len(ordered)} files, {sum(ordered.values()):.0f} s in all")


if __name__ == "__main__":
  main(sys.argv[1])
