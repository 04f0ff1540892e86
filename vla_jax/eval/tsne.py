"""t-SNE of how a layer represents an object's name in context.

For each image of a few object classes the prompt "Do you see the {object}?" is fed with
the image; `object_token_embeddings` takes a chosen layer's hidden state at the last
token of the object's name (the token that has read the whole name and the image), and
`tsne_plot` embeds them in 2-D with scikit-learn's t-SNE, coloured by class.
"""

from typing import Any, List, Sequence, Tuple

import jax
import numpy as np

from vla_jax.errors import InputError
from vla_jax.models.vla import VLA
from vla_jax.text import Tokenizer


def object_prompt_tokens(tokenizer: Tokenizer, names: Sequence[str],
                         template: str = "Do you see the {object}?"
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded prompts and where each object name ends.

  Returns:
    (tokens int32 [B, L], lengths int32 [B], object_index int32 [B]: text index of the
    name's last token).
  """
  head = template.split("{object}")[0]
  rows, ends = [], []
  for name in names:
    ids = tokenizer.encode(template.format(object=name))
    upto = tokenizer.encode(head + name)
    if ids[:len(upto)] != upto:
      raise InputError(f"the tokenisation of {name!r} changes with what follows it in "
                       f"{template!r}; use a template with a space or punctuation after it.")
    rows.append(ids)
    ends.append(len(upto) - 1)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.vocab_size
  tokens = np.full((len(rows), max(map(len, rows))), pad, np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
  return tokens, np.asarray([len(r) for r in rows], np.int32), np.asarray(ends, np.int32)


def object_token_embeddings(model: VLA, params: Any, images: np.ndarray, tokens: np.ndarray,
                            lengths: np.ndarray, object_index: np.ndarray, layer: int,
                            batch_size: int = 64) -> np.ndarray:
  """Hidden state after `layer` blocks at each row's object token: float32 [B, D]."""
  cfg = model.config
  if not 0 <= layer <= cfg.llm.depth:
    raise InputError(f"layer must be in [0, {cfg.llm.depth}], got {layer}.")

  @jax.jit
  def embed(images, tokens, lengths, index):
    mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
    hidden = model.apply({"params": params}, images, tokens, mask, return_all_hidden=True)
    # Text token t >= visual_start sits at t + N in the sequence.
    position = index + cfg.num_visual_tokens * (index >= cfg.visual_start)
    return hidden["hidden"][layer][jax.numpy.arange(tokens.shape[0]), position]

  out = [np.asarray(embed(images[i:i + batch_size], tokens[i:i + batch_size],
                          lengths[i:i + batch_size], object_index[i:i + batch_size]))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.float32)


def tsne_plot(embeddings: np.ndarray, labels: np.ndarray, class_names: List[str], path: str,
              title: str = "", seed: int = 0) -> np.ndarray:
  """2-D t-SNE of embeddings [n, D] saved as a scatter PNG; returns the points [n, 2]."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  # A Figure without pyplot: no global backend switch (a notebook keeps its inline plots).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  if len(embeddings) < 4:
    raise InputError(f"t-SNE needs at least 4 points, got {len(embeddings)}.")
  points = TSNE(2, perplexity=min(30.0, (len(embeddings) - 1) / 3), init="pca",
                random_state=seed).fit_transform(np.asarray(embeddings, np.float64))
  fig = Figure(figsize=(4.2, 3.6))
  ax = fig.subplots()
  for label, name in enumerate(class_names):
    sel = labels == label
    ax.scatter(points[sel, 0], points[sel, 1], s=12, label=name)
  ax.legend(fontsize=7, loc="best")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return points
