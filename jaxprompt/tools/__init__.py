"""Tools around training: `plan` (memory/FLOPs ahead of time), `bench` (step times vs PEFT), `inspect` (what a
prompt looks like), `costs` (FLOP counting)."""
