"""Training: the train state and trainable mask, the fused step, sharding and checkpoints.

`state` (TrainConfig, TrainState, the trainable mask, the optimizer), `step`
(`make_train_step`, `make_eval_step`), `sharding` (mesh, partition rules, sharded jit)
and `checkpoint` (Orbax manager, export). The loop that drives them is `train/loop.py`.
"""
