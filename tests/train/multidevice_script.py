"""Run by test_sharding.py in a subprocess with 8 fake CPU devices; prints a JSON report.

One train step on one device is the reference; the same step on data-parallel, FSDP
and FSDP+tensor meshes must give the same metrics and parameters. The FSDP state is
then checkpointed and restored onto a 2-device mesh and onto one device.
"""

import json
import sys
import tempfile

import jax
import numpy as np

from tests.train.helpers import ACTION_TOKENIZER, _config, make_batch, small_experiment
from vla_jax import modeling
from vla_jax.errors import ConfigError
from vla_jax.train import checkpoint as ckpt_lib
from vla_jax.train import sharding as sharding_lib
from vla_jax.train import state as state_lib
from vla_jax.train import step as step_lib

jax.config.update("jax_default_matmul_precision", "highest")


def max_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                       jax.device_get(a), jax.device_get(b))
  return max(jax.tree.leaves(diffs))


def count_constraints(hlo_text):
  """Sharding constraints on a real mesh in lowered StableHLO (Shardy's spelling; the
  step's own rng handling adds two on an empty mesh, not counted)."""
  return sum("sharding_constraint" in line and "@empty_mesh" not in line
             for line in hlo_text.splitlines())


def spec_of(state, *path):
  leaf = state.params
  for key in path:
    leaf = leaf[key]
  return [list(s) if isinstance(s, tuple) else s for s in leaf.sharding.spec]


def main():
  assert jax.device_count() == 8, jax.devices()
  experiment = small_experiment()
  models = modeling.build_models(experiment)
  params = modeling.init_params(models, experiment, jax.random.key(0))
  # Large Adam epsilon: the first update is linear in the gradient (see test_step.py).
  config = _config(batch_size=8, learning_rate=1.0, adam_eps=1.0)
  batch = make_batch(0, batch_size=8)
  train_step = step_lib.make_train_step(models, experiment, config, ACTION_TOKENIZER)
  create = lambda p: state_lib.create_train_state(experiment, config, p, jax.random.key(1))

  state, frozen = create(params)
  ref_state, ref_metrics = jax.jit(train_step)(state, frozen, batch)
  report = {"meshes": {}, "activation_constraints_without_mesh": count_constraints(
      jax.jit(train_step).lower(state, frozen, batch).as_text())}
  meshes = {
      "data": sharding_lib.ShardingConfig(data=8),
      "fsdp": sharding_lib.ShardingConfig(data=1, fsdp=-1, fsdp_min_size=256),
      "fsdp_tensor": sharding_lib.ShardingConfig(data=1, fsdp=4, tensor=2, fsdp_min_size=256),
  }
  fsdp_state = None
  for name, sharding_config in meshes.items():
    mesh = sharding_lib.make_mesh(sharding_config)
    (state, frozen), (state_sh, frozen_sh) = sharding_lib.sharded_init(
        create, mesh, sharding_config, params)
    step = sharding_lib.jit_train_step(train_step, mesh, state_sh, frozen_sh)
    sharding_lib.check_batch_size(8, mesh)
    sharded_batch = sharding_lib.shard_batch(batch, mesh)
    constraints = count_constraints(step.lower(state, frozen, sharded_batch).as_text())
    new_state, metrics = step(state, frozen, sharded_batch)
    report["meshes"][name] = {
        "loss_diff": abs(float(metrics["loss/total"]) - float(ref_metrics["loss/total"])),
        "metric_diff": max_diff(metrics, ref_metrics),
        "param_diff": max_diff(new_state.params, ref_state.params),
        "lm_head_spec": spec_of(new_state, "llm", "lm_head", "kernel"),
        "q_proj_spec": spec_of(new_state, "llm", "layers_0", "attn", "q_proj", "kernel"),
        # Block boundaries of the student's towers and LLM and of the teacher.
        "activation_constraints": constraints,
        "teacher_embedding_spec": [
            s for s in frozen["teacher"]["tower"]["pos_embedding"].sharding.spec],
    }
    try:
      sharding_lib.check_batch_size(6, mesh)
      report["meshes"][name]["bad_batch_error"] = ""
    except ConfigError as e:
      report["meshes"][name]["bad_batch_error"] = str(e)
    if name == "fsdp":
      fsdp_state = new_state

  # In-layer LoRA under scan (factors stacked per layer, `lora` scanned like the params) on
  # the FSDP x tensor mesh: same step as on one device.
  lora_experiment = small_experiment(lora=True, scan=True)
  lora_models = modeling.build_models(lora_experiment)
  lora_params = modeling.init_params(lora_models, lora_experiment, jax.random.key(0))
  lora_config = _config(batch_size=8, learning_rate=1.0, adam_eps=1.0, trainable="lora")
  lora_step = step_lib.make_train_step(lora_models, lora_experiment, lora_config,
                                       ACTION_TOKENIZER)
  lora_create = lambda p: state_lib.create_train_state(lora_experiment, lora_config, p,
                                                       jax.random.key(1))
  state, frozen = lora_create(lora_params)
  # Two steps: the first moves B off zero, so the second's factors see the LoRA path.
  ref_lora = [jax.jit(lora_step)(state, frozen, batch)]
  ref_lora.append(jax.jit(lora_step)(ref_lora[0][0], frozen, make_batch(1, batch_size=8)))
  sharding_config = meshes["fsdp_tensor"]
  mesh = sharding_lib.make_mesh(sharding_config)
  (state, frozen), (state_sh, frozen_sh) = sharding_lib.sharded_init(
      lora_create, mesh, sharding_config, lora_params)
  step = sharding_lib.jit_train_step(lora_step, mesh, state_sh, frozen_sh)
  state, _ = step(state, frozen, sharding_lib.shard_batch(batch, mesh))
  state, metrics = step(state, frozen, sharding_lib.shard_batch(make_batch(1, batch_size=8),
                                                                 mesh))
  report["lora_scan_fsdp_tensor"] = {
      "in_layer": lora_experiment.lora.in_layer,
      "scanned_factors": sum("/layers/" in path for path in state.lora),
      "loss_diff": abs(float(metrics["loss/total"]) - float(ref_lora[1][1]["loss/total"])),
      "lora_diff": max_diff(state.lora, ref_lora[1][0].lora),
      "lora_scale": max(float(np.max(np.abs(b["b"]))) for b in jax.device_get(state.lora).values())}

  # Save on the 8-device FSDP mesh, restore onto 2 devices and onto 1 device.
  abstract = jax.eval_shape(lambda p: create(p)[0], params)
  with tempfile.TemporaryDirectory() as workdir:
    manager = ckpt_lib.make_manager(workdir)
    ckpt_lib.save(manager, 1, fsdp_state, fsdp_state.params, {"config": {}},
                  {"examples_seen": 8})
    manager.wait_until_finished()
    report["restore"] = {}
    for count in (2, 1):
      sharding_config = sharding_lib.ShardingConfig(data=1, fsdp=count, fsdp_min_size=256)
      mesh = sharding_lib.make_mesh(sharding_config, jax.devices()[:count])
      shardings = sharding_lib.tree_shardings(abstract, mesh, sharding_config)
      restored, _, position = ckpt_lib.restore(manager, abstract, shardings)
      report["restore"][str(count)] = {
          "diff": max_diff(restored.params, fsdp_state.params),
          "opt_diff": max_diff(restored.opt_state, fsdp_state.opt_state),
          "devices": len(restored.params["llm"]["lm_head"]["kernel"].sharding.device_set),
          "position": position}
    manager.close()
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main()
