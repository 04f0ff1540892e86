"""Run by test_sharding.py with 8 fake CPU devices: sharded init and checkpoint loading.

`modeling.create_params` with FSDP shardings reads a converted (Orbax) student, a
big_vision `.npz` teacher, and then a vla_jax export, and initialises only what they do
not provide. The report (JSON on stdout) says, for every parameter, whether it sits on
its target sharding with shard-sized buffers, whether any array of full size is alive on
a single device, and how far the values are from the unsharded reference.
"""

import gc
import json
import os
import sys
import tempfile

import jax
import numpy as np
from flax import traverse_util

from tests.train.helpers import small_experiment
from vla_jax import modeling
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import sharding as sharding_lib
from vla_jax.weights import convert as convert_lib
from vla_jax.weights import siglip as siglip_weights


def placement(params, shardings):
  """How the leaves of `params` sit on the devices, against their target `shardings`."""
  flat, targets = traverse_util.flatten_dict(params), traverse_util.flatten_dict(shardings)
  wrong_sharding, wrong_buffers, split = [], [], 0
  for path, leaf in flat.items():
    target = targets[path]
    name = "/".join(path)
    if not leaf.sharding.is_equivalent_to(target, leaf.ndim):
      wrong_sharding.append(name)
    shard_shape = target.shard_shape(leaf.shape)
    if any(s.data.shape != shard_shape for s in leaf.addressable_shards):
      wrong_buffers.append(name)
    if shard_shape != leaf.shape:
      split += 1
  per_device = {}
  for leaf in flat.values():
    for shard in leaf.addressable_shards:
      per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
  return {"leaves": len(flat), "split": split, "wrong_sharding": wrong_sharding,
          "wrong_buffers": wrong_buffers,
          "total_bytes": sum(leaf.nbytes for leaf in flat.values()),
          "max_device_bytes": max(per_device.values())}


def whole_on_one_device(params, shardings):
  """Live single-device arrays shaped like a whole parameter that should be split.

  (A sharded array's own per-device buffers are live arrays too: shapes that are also
  some split parameter's shard shape are not counted.)
  """
  gc.collect()
  flat, targets = traverse_util.flatten_dict(params), traverse_util.flatten_dict(shardings)
  split = {path: targets[path].shard_shape(leaf.shape) for path, leaf in flat.items()
           if targets[path].shard_shape(leaf.shape) != leaf.shape}
  whole = {tuple(flat[path].shape) for path in split} - set(split.values())
  return [list(a.shape) for a in jax.live_arrays()
          if len(a.sharding.device_set) == 1 and tuple(a.shape) in whole]


def max_diff(params, reference):
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       jax.device_get(params), reference)
  return max(jax.tree.leaves(diffs))


def main():
  assert jax.device_count() == 8, jax.devices()
  experiment = small_experiment()
  models = modeling.build_models(experiment)
  config = sharding_lib.ShardingConfig(data=1, fsdp=-1, fsdp_min_size=256)
  mesh = sharding_lib.make_mesh(config)
  shardings = sharding_lib.tree_shardings(modeling.abstract_params(models, experiment), mesh,
                                          config)
  # The unsharded reference, kept on the host only (a device copy would count as whole).
  reference = jax.device_get(modeling.init_params(models, experiment, jax.random.key(0)))
  checkpoint = jax.device_get(modeling.init_params(models, experiment, jax.random.key(7)))
  gc.collect()
  report = {}
  with tempfile.TemporaryDirectory() as tmp:
    student_dir = os.path.join(tmp, "student")
    convert_lib.save_converted(student_dir, checkpoint["student"], experiment.model)
    teacher_npz = os.path.join(tmp, "teacher.npz")
    siglip_weights.save_big_vision(teacher_npz, checkpoint["teacher"]["tower"])
    weights = {"student": student_dir, "student_format": "orbax",
               "teacher": teacher_npz, "teacher_format": "big_vision"}
    params = modeling.create_params(models, experiment, weights, jax.random.key(0), shardings)
    report["checkpoints"] = {
        **placement(params, shardings),
        "whole_on_one_device": whole_on_one_device(params, shardings),
        "student_diff": max_diff(params["student"], checkpoint["student"]),
        "teacher_diff": max_diff(params["teacher"], checkpoint["teacher"]),
        # Not in any checkpoint: initialised, with the values of a full init.
        "projector_diff": max_diff(params["projector"], reference["projector"]),
    }
    del params

    export_dir = ckpt_lib.export(os.path.join(tmp, "export"), checkpoint["student"],
                                 experiment, {})
    params = modeling.create_params(models, experiment,
                                    {"student": export_dir, "student_format": "export"},
                                    jax.random.key(0), shardings)
    report["export"] = {
        **placement(params, shardings),
        "whole_on_one_device": whole_on_one_device(params, shardings),
        "student_diff": max_diff(params["student"], checkpoint["student"]),
        "teacher_diff": max_diff(params["teacher"], reference["teacher"]),
    }
    del params

    params = modeling.create_params(models, experiment, {}, jax.random.key(0), shardings)
    report["random"] = {**placement(params, shardings),
                        "whole_on_one_device": whole_on_one_device(params, shardings),
                        "diff": max_diff(params, reference)}
    del params
  # The check can fail: the unsharded init (the old path) holds whole tensors on device 0.
  unsharded = modeling.init_params(models, experiment, jax.random.key(0))
  report["control_whole_on_one_device"] = len(whole_on_one_device(
      jax.device_put(unsharded, shardings), shardings))
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main()
