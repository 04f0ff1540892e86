"""Loaders place each tensor straight onto its sharding (8 fake CPU devices).

Runs in a subprocess because the device count is fixed when JAX starts.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, xla_flags

pytestmark = pytest.mark.slow  # end-to-end / multi-process

_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from vla_jax.models import vit as vit_lib
    from vla_jax.weights import convert, siglip
    assert len(jax.devices()) == 8, jax.devices()
    config = vit_lib.vit_config("mu/16", width=64, num_heads=4, mlp_dim=128, image_size=32)
    abstract = vit_lib.abstract_params(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
    siglip.save_big_vision("{tmp}/vit.npz", params)
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    def spec(a):  # shard the largest dimension divisible by 8, else replicate
      dims = [i for i in np.argsort(a.shape)[::-1] if a.shape[i] % 8 == 0]
      parts = [None] * len(a.shape)
      if dims:
        parts[dims[0]] = "fsdp"
      return NamedSharding(mesh, P(*parts))
    shardings = jax.tree.map(spec, abstract)
    sharded = siglip.load_big_vision("{tmp}/vit.npz", config, shardings=shardings)
    plain = siglip.load_big_vision("{tmp}/vit.npz", config)
    kernel = sharded["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.sharding == shardings["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape[1] == 16
    jax.tree.map(np.testing.assert_array_equal, sharded, plain)
    path = convert.save_converted("{tmp}/orbax", sharded, config)
    restored, _ = convert.load_converted(path, config, abstract, shardings)
    assert restored["pos_embedding"].sharding == shardings["pos_embedding"]
    jax.tree.map(np.testing.assert_array_equal, restored, plain)
    image = np.zeros((8, 32, 32, 3), np.float32)
    out_sharded = vit_lib.ViT(config).apply({{"params": sharded}}, image)[0]
    out_plain = vit_lib.ViT(config).apply({{"params": plain}}, image)[0]
    np.testing.assert_allclose(out_sharded, out_plain, rtol=1e-4, atol=1e-4)
    print("OK")
""")


def test_sharded_loading_equals_single_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SCRIPT.format(tmp=tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
