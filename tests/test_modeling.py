"""modeling: a partial init traces the models once and equals the full init; create_params
builds only the parts asked for."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.train.helpers import small_experiment
from vla_jax import modeling


def test_init_of_some_leaves_traces_once_and_equals_the_full_init(monkeypatch):
  experiment = small_experiment()
  models = modeling.build_models(experiment)
  full = traverse_util.flatten_dict(modeling.init_params(models, experiment, jax.random.key(0)))
  calls = []
  original = modeling._init_all  # pylint: disable=protected-access
  monkeypatch.setattr(modeling, "_init_all", lambda *args: calls.append(1) or original(*args))
  paths = sorted(full)[::3]
  part = modeling.init_params(models, experiment, jax.random.key(0), only=paths)
  # Once, not once per leaf (a per-leaf trace made every run's init quadratic).
  assert len(calls) == 1
  assert sorted(part) == paths
  for path in paths:
    np.testing.assert_array_equal(part[path], full[path])


def test_create_params_of_some_parts_reads_and_builds_only_those():
  experiment = small_experiment()
  models = modeling.build_models(experiment)
  full = modeling.create_params(models, experiment, {}, jax.random.key(0))
  # A student checkpoint that does not exist is never opened when only the teacher is asked.
  weights = {"student": "/nonexistent/student", "student_format": "hf", "teacher": ""}
  teacher = modeling.create_params(models, experiment, weights, jax.random.key(0),
                                   parts=("teacher",))
  assert set(teacher) == {"teacher"}
  jax.tree.map(np.testing.assert_array_equal, teacher["teacher"], full["teacher"])
  with pytest.raises(ValueError, match="unknown parts"):
    modeling.create_params(models, experiment, {}, jax.random.key(0), parts=("teachr",))
