"""The three models of an alignment experiment and the forward pass that joins them.

An `Experiment` (student VLA, frozen teacher, frozen alignment projector) becomes
`Models`; `create_params` reads the local checkpoints the config names
(`read_checkpoints`) and initialises only what they do not provide (`init_params`), each
tensor straight onto its sharding when a mesh is given. `aligned_forward`
is the pure function at the heart of training: one student pass that returns logits
and the `align_layer` hidden states at the visual tokens (of every layer in
`align_layers`, when several are aligned), one teacher pass on the same images under
`stop_gradient`, the frozen projector(s), and `loss/align` with its metrics.
"""

import dataclasses
import logging
from typing import Any, Collection, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from vla_jax.errors import ConfigError
from vla_jax.experiment import Experiment
from vla_jax.models import align as align_lib
from vla_jax.models.teacher import Teacher
from vla_jax.models.vla import VLA, dummy_inputs
from vla_jax.weights import convert as convert_lib
from vla_jax.weights import teacher as teacher_weights
from vla_jax.weights import vla as vla_weights


@dataclasses.dataclass(frozen=True)
class Models:
  """Stateless flax modules of one experiment (parameters live elsewhere)."""
  student: VLA
  teacher: Teacher
  projector: Any  # align.AlignProjector, or align.MultiProjector for several layers


def build_models(experiment: Experiment) -> Models:
  return Models(
      student=VLA(experiment.model),
      teacher=Teacher(experiment.teacher),
      projector=align_lib.build_projector(experiment.align,
                                          teacher_dim=experiment.teacher.width))


def _init_all(models: Models, experiment: Experiment, rng):
  images, tokens = dummy_inputs(experiment.model, 1, 4)
  keys = jax.random.split(rng, 3)
  student = models.student.init(keys[0], images, tokens)["params"]
  teacher = models.teacher.init(keys[1], images, experiment.model.grid,
                                experiment.align.grid_match)["params"]
  hidden = jnp.zeros((1, experiment.model.num_visual_tokens, experiment.model.llm.width))
  if experiment.align.multi_layer:  # one hidden state per aligned layer
    hidden = (hidden,) * len(experiment.align.layers)
  projector = models.projector.init(keys[2], hidden)["params"]
  return {"student": student, "teacher": teacher, "projector": projector}


def abstract_params(models: Models, experiment: Experiment) -> Dict[str, Any]:
  """Shape/dtype pytree of all parameters, without computing anything."""
  return jax.eval_shape(lambda: _init_all(models, experiment, jax.random.key(0)))


def init_params(models: Models, experiment: Experiment, rng, shardings: Any = None,
                only: Optional[Collection[Tuple[str, ...]]] = None) -> Dict[str, Any]:
  """Random parameters for student, teacher and projector (one jitted init).

  Args:
    shardings: optional pytree like the params of `jax.sharding.Sharding`s: every leaf is
      then created directly on its devices, never gathered on one.
    only: optional flat paths (key tuples, e.g. ("projector", "layers_0", "kernel")):
      create just these leaves (the others are not computed) and return them as a flat
      {path: array} dict. Their values equal the full init's for the same `rng`.
  """
  if only is None:
    return jax.jit(lambda r: _init_all(models, experiment, r), out_shardings=shardings)(rng)
  only = tuple(only)
  if not only:
    return {}
  flat_shardings = None
  if shardings is not None:
    all_shardings = traverse_util.flatten_dict(shardings)
    flat_shardings = {path: all_shardings[path] for path in only}
  def pick(r):
    flat = traverse_util.flatten_dict(_init_all(models, experiment, r))  # traced once
    return {path: flat[path] for path in only}
  return jax.jit(pick, out_shardings=flat_shardings)(rng)


BUNDLED = "bundled"


def check_bundled_teacher(teacher_format: str, experiment: Experiment) -> None:
  """ConfigError unless `weights.teacher='bundled'` can be built for this experiment: the
  CPU-sized pretraining writes a SigLIP tower as a big_vision `.npz`."""
  if teacher_format != "big_vision":
    raise ConfigError("weights.teacher='bundled' is a big_vision .npz; set "
                      "weights.teacher_format='big_vision'.")
  if experiment.teacher.kind != "siglip":
    raise ConfigError("weights.teacher='bundled' exists for SigLIP teachers only; this "
                      f"experiment's teacher is {experiment.teacher.kind!r}. Point "
                      "weights.teacher at a checkpoint or set it to ''.")


def resolve_bundled_weights(weights: Any, experiment: Experiment) -> Dict[str, Any]:
  """`weights` with "bundled" entries replaced by the cached pretrained checkpoints.

  `weights.student_vision` / `weights.teacher` = "bundled" name the CPU-sized vision
  pretraining of `vla_jax.train.pretrain`, `weights.student` = "bundled" the whole
  question-answering student of `vla_jax.train.vlm_pretrain` (format "bundled"; it
  speaks the bundled tokenizer). All are built on first use and cached.
  """
  weights = dict(weights.to_dict() if hasattr(weights, "to_dict") else weights)
  wanted = [k for k in ("student_vision", "teacher", "student") if weights.get(k) == BUNDLED]
  if not wanted:
    return weights
  if "teacher" in wanted:
    check_bundled_teacher(weights.get("teacher_format", "big_vision"), experiment)
  from vla_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  built = pretrain.ensure_pretrained(experiment, parts=tuple(wanted))
  for key in wanted:
    weights[key] = built[key]
  if "student" in wanted:
    weights["student_format"] = BUNDLED
  return weights


def _placed(tree: Any, shardings: Any) -> Any:
  """A host-loaded tree put on its shardings leaf by leaf (for the small CPU-sized formats
  whose readers have no sharded path)."""
  if shardings is None:
    return tree
  return jax.tree.map(jax.device_put, tree, _matching(shardings, tree))


def _matching(shardings: Any, tree: Any) -> Any:
  """The part of the `shardings` tree that has `tree`'s keys (a subtree-only checkpoint)."""
  if not isinstance(tree, dict):
    return shardings
  return {k: _matching(shardings[k], v) for k, v in tree.items()}


def read_checkpoints(models: Models, experiment: Experiment, weights: Any,
                     shardings: Any = None) -> Dict[str, Any]:
  """The parameters that the checkpoints named in `weights` provide, nothing else.

  `weights` holds `student`, `student_format`, `teacher`, `teacher_format` (empty paths
  are skipped) and optionally `student_vision` (pretrained towers + projector laid over
  the student, `vla_jax.train.pretrain`). Format "orbax" reads a converted checkpoint;
  "export" a vla_jax export (`--mode=export`: fine-tune from an earlier run); "bundled"
  builds the CPU-sized pretraining on first use.

  Args:
    shardings: optional pytree like the params ({"student", "teacher", "projector"}) of
      shardings; the HF, big_vision, Orbax and export readers then place each tensor
      straight onto its devices, one tensor at a time (safetensors memory-mapped).
  Returns:
    A partial params tree: {"student": ..., "teacher": ...} for the parts (or, with
    `student_vision` only, the subtrees) that a checkpoint provides.
  """
  weights = resolve_bundled_weights(weights, experiment)
  part_shardings = shardings or {}
  loaded: Dict[str, Any] = {}
  loaders = {"student": (experiment.model, vla_weights.load_student, "hf"),
             "teacher": (experiment.teacher, teacher_weights.load_teacher, "big_vision")}
  for part, (config, load, default_format) in loaders.items():
    if not weights.get(part):
      continue
    fmt = weights.get(f"{part}_format", default_format)
    target = part_shardings.get(part)
    logging.info("Loading %s weights (%s) from %s", part, fmt, weights[part])
    if fmt == "orbax":
      abstract = abstract_params(models, experiment)[part]
      loaded[part], _ = convert_lib.load_converted(weights[part], config, abstract, target)
    elif part == "student" and fmt == "export":  # a vla_jax run, exported: fine-tune on
      from vla_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
      loaded[part] = checkpoint.load_export_as_student(weights[part], experiment, target)
    elif part == "student" and fmt == BUNDLED:
      from vla_jax.train import pretrain  # pylint: disable=g-import-not-at-top
      loaded[part] = _placed(pretrain.load_student(weights[part], experiment), target)
    else:
      loaded[part] = load(weights[part], config, fmt, shardings=target)
  if weights.get("student_vision"):
    from vla_jax.train import pretrain  # pylint: disable=g-import-not-at-top
    logging.info("Loading pretrained student vision from %s", weights["student_vision"])
    vision = pretrain.load_student_vision(weights["student_vision"], experiment)
    loaded["student"] = {**loaded.get("student", {}),
                         **_placed(vision, part_shardings.get("student"))}
  return loaded


PARTS = ("student", "teacher", "projector")


def create_params(models: Models, experiment: Experiment, weights: Any, rng,
                  shardings: Any = None, parts: Sequence[str] = PARTS) -> Dict[str, Any]:
  """All parameters of an experiment: checkpoint tensors where `weights` names a
  checkpoint (`read_checkpoints`), a random init (`init_params`, the same values as a
  full init with `rng`) for every leaf none provides (the projector, the LoRA-free rest).

  With `shardings` (e.g. `sharding.tree_shardings(abstract_params(...), mesh, config)`)
  no step holds the whole tree on one device or in host memory: checkpoint tensors are
  read one at a time onto their shards and the random leaves are created under
  `jax.jit(out_shardings=...)`, computing only those leaves. `parts` limits the result
  to some of "student", "teacher", "projector": the others' checkpoints are not read
  and their leaves not initialised (e.g. rebuilding a student needs no teacher).
  """
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f"create_params: unknown parts {unknown}; choose from {PARTS}.")
  weights = dict(weights.to_dict() if hasattr(weights, "to_dict") else weights)
  if "student" not in parts:
    weights.update(student="", student_vision="")
  if "teacher" not in parts:
    weights["teacher"] = ""
  abstract = {path: leaf for path, leaf in
              traverse_util.flatten_dict(abstract_params(models, experiment)).items()
              if path[0] in parts}
  loaded = traverse_util.flatten_dict(read_checkpoints(models, experiment, weights, shardings))
  for path, value in loaded.items():
    expected = abstract.get(path)
    if expected is None or tuple(value.shape) != tuple(expected.shape):
      raise ConfigError(
          f"checkpoint parameter {'/'.join(path)} {tuple(value.shape)} does not fit this "
          f"experiment ({'absent' if expected is None else tuple(expected.shape)}); the "
          "config (model / teacher) must describe the checkpoint's model.")
  missing = [path for path in abstract if path not in loaded]
  fresh = init_params(models, experiment, rng, shardings, only=missing)
  return traverse_util.unflatten_dict({**fresh, **loaded})


def aligned_forward(models: Models, experiment: Experiment, params: Dict[str, Any], images,
                    tokens, input_mask=None) -> Tuple[Dict[str, Any], jax.Array, Dict[str, Any]]:
  """Student + teacher + projector in one pure function.

  Args:
    params: {"student", "teacher", "projector"} pytrees.
    images: [B, H, W, 3] in [0, 1]; tokens / input_mask: [B, T].
  Returns:
    (student outputs dict, loss/align scalar, metrics dict). With several aligned layers
    `out["align_hidden"]` is a tuple (one per layer), loss/align their summed losses and
    the metrics carry per-layer entries (`align.multi_layer_alignment_loss`).
  """
  model, align = experiment.model, experiment.align
  out = models.student.apply({"params": params["student"]}, images, tokens, input_mask,
                             align_layer=align.capture)
  teacher_features = models.teacher.apply({"params": params["teacher"]}, images, model.grid,
                                          align.grid_match)
  teacher_features = jax.lax.stop_gradient(teacher_features)
  loss, metrics = align_lib.alignment_from_hidden(align, models.projector, params["projector"],
                                                  out["align_hidden"], teacher_features)
  return out, loss, {"loss/align": loss, **metrics}
