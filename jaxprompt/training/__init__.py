"""Training: the state, the pure step, the optimizer, checkpoints, the trainer and its hooks.

state       `TrainState`: prompt, optimizer state, step, data position, best eval, RNG seed
losses      token cross-entropy with z-loss
step        the pure jitted train step
optim       Optax transforms from `config.OptimizerConfig`, on the prompt only
checkpoint  Orbax checkpoints of the trainable state (never the base model)
hooks       what happens between steps, each on its own cadence (log, eval, checkpoint, stop, plot)
tracking    metrics.jsonl, TensorBoard, curves.png
trainer     `train` / `evaluate`: the loop, reading as the data flow
"""
