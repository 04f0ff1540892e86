"""Write episodes to disk as an RLDS dataset that `tfds.builder_from_directory` reads.

RLDS (the Open X-Embodiment format) is a TFDS dataset whose examples are episodes with
a nested `steps` dataset. `write_rlds` builds such a dataset from in-memory episodes
(dicts of numpy arrays) through a TFDS `GeneratorBasedBuilder`, so the files, the
`features.json` and the `dataset_info.json` are exactly what TFDS itself writes. Used
by the tabletop benchmark's demo export and by tests that need small datasets.

An episode is `{"steps": [step, ...], "episode_metadata": {...}}` where each step
matches `step_features` (see `openx_step_features` for the standard layout).
"""

import os
import shutil
import types
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds

from vla_jax.errors import InputError


def openx_step_features(image_shape=(64, 64, 3), state_dim: int = 7, action_dim: int = 7,
                        image_keys=("image",)) -> tfds.features.FeaturesDict:
  """Open-X step layout: observation/{image keys (JPEG), state}, action, language, flags."""
  observation = {key: tfds.features.Image(shape=tuple(image_shape), dtype=np.uint8,
                                          encoding_format="jpeg") for key in image_keys}
  observation["state"] = tfds.features.Tensor(shape=(state_dim,), dtype=np.float32)
  return tfds.features.FeaturesDict({
      "observation": tfds.features.FeaturesDict(observation),
      "action": tfds.features.Tensor(shape=(action_dim,), dtype=np.float32),
      "language_instruction": tfds.features.Text(),
      "is_first": tfds.features.Scalar(dtype=np.bool_),
      "is_last": tfds.features.Scalar(dtype=np.bool_),
      "is_terminal": tfds.features.Scalar(dtype=np.bool_),
      "reward": tfds.features.Scalar(dtype=np.float32),
      "discount": tfds.features.Scalar(dtype=np.float32),
  })


def _builder_class(name: str, version: str, features: tfds.features.FeaturesDict,
                   splits: Mapping[str, Callable[[], Iterable[Dict[str, Any]]]],
                   description: str):
  """A GeneratorBasedBuilder subclass named `name` that yields the given episodes."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=description, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(make()) for split, make in splits.items()}

  def _generate_examples(self, episodes):
    for index, episode in enumerate(episodes):
      yield f"episode_{index:07d}", episode

  # TFDS derives the dataset name from the class name (CamelCase -> snake_case).
  # skip_registration: TFDS's global registry would refuse a second class of this name.
  class_name = "".join(part.capitalize() or "_" for part in name.split("_"))
  body = {"VERSION": tfds.core.Version(version), "_info": _info,
          "_split_generators": _split_generators, "_generate_examples": _generate_examples,
          "__module__": __name__, "name": name}
  return types.new_class(class_name, (tfds.core.GeneratorBasedBuilder,),
                         {"skip_registration": True}, lambda ns: ns.update(body))


def write_rlds(data_dir: str, name: str, splits: Mapping[str, Callable[[], Iterable[dict]]], *,
               step_features: Optional[tfds.features.FeaturesDict] = None,
               metadata_features: Optional[Mapping[str, Any]] = None, version: str = "1.0.0",
               description: str = "", overwrite: bool = False) -> str:
  """Writes an RLDS dataset and returns its directory (`data_dir/name/version`).

  Args:
    data_dir: parent directory.
    name: dataset name (snake_case).
    splits: split name -> zero-argument callable returning an iterable of episodes
      (called once, so episodes can be generated lazily).
    step_features: the step FeaturesDict; default `openx_step_features()`.
    metadata_features: `episode_metadata` features ({key: tfds feature}); None = none.
    version: dataset version string.
    overwrite: replace an existing dataset of the same name and version.
  Returns:
    The directory holding `features.json`, `dataset_info.json` and the TFRecord shards.
  """
  if not name.replace("_", "").isalnum() or name != name.lower():
    raise InputError(f"RLDS dataset name {name!r} must be snake_case letters and digits.")
  features = {"steps": tfds.features.Dataset(step_features or openx_step_features())}
  if metadata_features:
    features["episode_metadata"] = tfds.features.FeaturesDict(dict(metadata_features))
  out_dir = os.path.join(data_dir, name, version)
  if os.path.exists(out_dir):
    if not overwrite:
      raise InputError(f"{out_dir} already exists; pass overwrite=True to replace it.")
    shutil.rmtree(out_dir)
  builder = _builder_class(name, version, tfds.features.FeaturesDict(features), splits,
                           description)(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False, try_download_gcs=False))
  return out_dir
