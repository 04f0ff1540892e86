"""Image-text pretraining of the study's teacher, the way big_vision trains SigLIP.

The paper's teachers were pretrained on the web; SigLIP, the one whose parameter names and
`.npz` format we keep, learned from image-caption pairs with a sigmoid loss. This module is
the CPU-sized version of that for the study (`vla_jax.study`, `PretrainConfig.
teacher_objective="siglip"`): the teacher's image tower, a MAP-pooled image head and a small
text tower learn to tell which caption belongs to which render. Captions are written from
the simulator's scene state and name everything a render shows: the target object
(colour, pattern, shape), where it is relative to the target receptacle in the image, the
other receptacles or VL-Think boards, the table and the background, and the gripper
(open / closed / holding). The heads and the text tower are thrown away; the image tower is
saved in big_vision's layout and loads through the normal teacher loader.

The loss is SigLIP's (Zhai et al., 2023): for a batch of n pairs, logits
`z_img @ z_txt.T * exp(t) + b` with L2-normalised embeddings and learned t (initially
log 10) and b (initially -10), and `-sum(log_sigmoid(labels * logits)) / n` with labels +1
on the diagonal and -1 elsewhere. `tests/train/test_siglip_pretrain.py` checks it against
transformers' `SiglipModel` loss.
"""

from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from vla_jax.errors import InputError
from vla_jax.models import vit as vit_lib
from vla_jax.text import Tokenizer

TEXT_DEPTH = 2  # blocks of the text tower (width and heads are the image tower's)
MAX_CAPTION_TOKENS = 144  # the bundled tokenizer spends ~2.5 characters per token
INIT_TEMPERATURE = float(np.log(10.0))  # big_vision's SigLIP initialisation
INIT_BIAS = -10.0


# ------------------------------------------------------------------------------- captions
def _relation(du: float, dv: float) -> str:
  """Where a point is relative to another in the image (u right, v down)."""
  if abs(du) >= abs(dv):
    return "left of" if du < 0 else "right of"
  return "above" if dv < 0 else "below"


def caption(scene: Dict[str, np.ndarray], row: int) -> str:
  """What frame `row` of `pretrain.render_keypoint_data` shows, in one sentence."""
  obj, rec = str(scene["object_name"][row]), str(scene["receptacle_name"][row])
  if not rec.startswith("the "):
    rec = "the " + rec
  (u_obj, v_obj), (u_rec, v_rec) = scene["keypoints"][row, 0], scene["keypoints"][row, 1]
  text = f"a {obj} {_relation(u_obj - u_rec, v_obj - v_rec)} {rec}"
  others = [name for key in ("other_objects", "other_receptacles")
            for name in str(scene[key][row]).split("|") if name]
  if others:
    text += ", also " + ", ".join(others)
  if scene["holding"][row] > 0.5:
    gripper = f"the gripper holds the {obj}"
  else:
    gripper = "the gripper is " + ("open" if scene["gripper"][row] > 0.5 else "closed")
  return (f"{text}, on a {scene['table_name'][row]} table before a "
          f"{scene['background_name'][row]} background; {gripper}")


def caption_tokens(scene: Dict[str, np.ndarray], tokenizer: Tokenizer,
                   max_length: int = MAX_CAPTION_TOKENS) -> Tuple[np.ndarray, np.ndarray]:
  """(ids int32 [N, max_length], mask bool [N, max_length]) of every frame's caption."""
  num = len(scene["images"])
  ids = np.zeros((num, max_length), np.int32)
  mask = np.zeros((num, max_length), bool)
  for row in range(num):
    text = caption(scene, row)
    tokens = tokenizer.encode(text)
    if len(tokens) > max_length:
      raise InputError(f"Caption {text!r} needs {len(tokens)} tokens > {max_length}; raise "
                       "max_length.")
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = True
  return ids, mask


# ------------------------------------------------------------------------------- towers
class TextTower(nn.Module):
  """Token + learned position embeddings, a ViT encoder, masked mean pool, linear head."""
  config: vit_lib.ViTConfig
  vocab_size: int
  max_length: int = MAX_CAPTION_TOKENS

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids, mask [B, L] -> embedding [B, width]."""
    cfg = self.config
    x = nn.Embed(self.vocab_size, cfg.width, name="Embed_0")(ids)
    x = x + self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                       (1, self.max_length, cfg.width))[:, :ids.shape[1]]
    x, _ = vit_lib.Encoder(cfg, name="Encoder_0")(x)
    weights = mask.astype(x.dtype)[..., None]
    pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return nn.Dense(cfg.width, name="head")(pooled)


class ImageHead(nn.Module):
  """big_vision's SigLIP image pooling: a MAP head over the patch tokens, then `head`."""
  config: vit_lib.ViTConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, N, D] -> embedding [B, width]."""
    pooled = vit_lib.MAPHead(self.config, name="MAPHead_0")(tokens.astype(jnp.float32))
    return nn.Dense(self.config.width, name="head")(pooled)


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array,
                 bias: jax.Array) -> jax.Array:
  """SigLIP's pairwise sigmoid loss of n matching (image, text) pairs (module docstring)."""
  normalise = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  logits = normalise(image_emb) @ normalise(text_emb).T * jnp.exp(temperature) + bias
  labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def _text_config(image: vit_lib.ViTConfig) -> vit_lib.ViTConfig:
  return vit_lib.ViTConfig(width=image.width, depth=TEXT_DEPTH, mlp_dim=image.mlp_dim,
                           num_heads=image.num_heads, pool_type="none",
                           gelu_approximate=image.gelu_approximate)


# ------------------------------------------------------------------------------- training
def pretrain_siglip(encode: Callable[[Any, jax.Array], jax.Array], params: Any,
                    tower: vit_lib.ViTConfig, data: Dict[str, np.ndarray],
                    tokenizer: Tokenizer, config: Any, *, desc: str = "pretrain teacher (SigLIP)",
                    progress: bool = True) -> Tuple[Any, Dict[str, float]]:
  """Trains the image tower `params` (`encode(params, images) -> [B, N, D]`) on captions.

  Args:
    tower: the image tower's config (width and heads of the heads and the text tower).
    data: `pretrain.render_keypoint_data` output (frames are shuffled once with
      `config.seed`; the last 5 %, at most 256, are held out).
    config: `pretrain.PretrainConfig` (steps, batch_size, learning_rate, warmup_steps, seed).
  Returns:
    (trained image-tower params, held-out {"pairs", "loss", "image_to_text",
     "text_to_image"}: how many held-out pairs, their sigmoid loss and top-1 retrieval
     accuracy among them (a caption identical to the right one counts as right), and for
     comparison "blind_loss" (the best loss of a model that ignores the images) and
     "chance" (retrieval accuracy of a random guess)).
  """
  order = np.random.default_rng(config.seed).permutation(len(data["images"]))
  images = data["images"][order]
  ids, mask = caption_tokens({k: v[order] for k, v in data.items()}, tokenizer)
  held_out = min(max(len(images) // 20, 2), 256)
  train_rows = len(images) - held_out
  text_tower = TextTower(_text_config(tower), tokenizer.vocab_size)
  image_head = ImageHead(tower)
  key_image, key_text = jax.random.split(jax.random.key(config.seed))
  sample = encode(params, jnp.asarray(images[:1]))
  trainable = {
      "vision": params,
      "image_head": image_head.init(key_image, sample)["params"],
      "text": text_tower.init(key_text, jnp.asarray(ids[:1]), jnp.asarray(mask[:1]))["params"],
      "temperature": jnp.asarray(INIT_TEMPERATURE, jnp.float32),
      "bias": jnp.asarray(INIT_BIAS, jnp.float32)}
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.steps,
      config.learning_rate * 0.05))
  opt_state = optimizer.init(trainable)

  def embed(trainable, images, ids, mask):
    image_emb = image_head.apply({"params": trainable["image_head"]},
                                 encode(trainable["vision"], images))
    return image_emb, text_tower.apply({"params": trainable["text"]}, ids, mask)

  def loss_fn(trainable, images, ids, mask):
    image_emb, text_emb = embed(trainable, images, ids, mask)
    return sigmoid_loss(image_emb, text_emb, trainable["temperature"], trainable["bias"])

  @jax.jit
  def step(trainable, opt_state, images, ids, mask):
    grads = jax.grad(loss_fn)(trainable, images, ids, mask)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  rng = np.random.default_rng(config.seed)
  for _ in tqdm.trange(config.steps, desc=desc, disable=not progress, leave=False):
    rows = rng.integers(0, train_rows, config.batch_size)
    trainable, opt_state = step(trainable, opt_state, images[rows], ids[rows], mask[rows])
  test = slice(train_rows, None)
  return trainable["vision"], _retrieval_metrics(
      jax.jit(embed), jax.jit(loss_fn), trainable, images[test], ids[test], mask[test])


def _retrieval_metrics(embed, loss_fn, trainable, images, ids, mask) -> Dict[str, float]:
  image_emb, text_emb = (np.asarray(z) for z in embed(trainable, images, ids, mask))
  similarity = image_emb @ text_emb.T / np.outer(np.linalg.norm(image_emb, axis=-1),
                                                  np.linalg.norm(text_emb, axis=-1))
  texts = [tuple(row[m]) for row, m in zip(ids, mask)]
  same = np.array([[a == b for b in texts] for a in texts])  # identical captions
  rows, n = np.arange(len(texts)), len(texts)
  return {"pairs": n, "loss": float(loss_fn(trainable, images, ids, mask)),
          # An image-blind model's best: sigmoid(logit) = 1/n for every pair.
          "blind_loss": float(np.log(n) - (n - 1) * np.log1p(-1 / n)),
          "image_to_text": float(same[rows, similarity.argmax(1)].mean()),
          "text_to_image": float(same[similarity.argmax(0), rows].mean()),
          "chance": float(same.mean())}
