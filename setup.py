"""vla_jax: Visual Representation Alignment for VLA fine-tuning in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vla_jax",
    version="0.1.0",
    description="Fine-tune vision-language-action models in JAX without blinding them.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vla_jax", "vla_jax.*"]),
    install_requires=[
        "jax>=0.4.35,<0.13",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.88,<0.2",
        "ml_collections>=0.1.1,<2",
        "ml_dtypes>=0.4",
        "numpy>=1.26",
        "tensorflow-cpu>=2.16,<2.22; platform_machine == 'x86_64'",
        "tensorflow>=2.16,<2.22; platform_machine != 'x86_64'",
        "tensorflow-datasets>=4.9.6,<5",
        "importlib_resources>=6",  # tfds needs it to write datasets, but does not declare it
        "sentencepiece>=0.2,<0.3",
        "absl-py>=2",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "scipy>=1.10",  # paired Wilcoxon test of evaluation comparisons
        "scikit-learn>=1.3",  # t-SNE of representations
    ],
    extras_require={
        # Parity tests compare against PyTorch reference implementations on the CPU.
        # Install a CPU build of torch first (see README), or pip pulls a CUDA build.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch>=2.4",
            "transformers>=4.46",
            "timm>=1.0.9",
            "safetensors>=0.4",
            # benchmarks/step_vs_torch.py's PyTorch reference step (LoRA as OpenVLA applies
            # it); tests/test_benchmarks.py runs it in --smoke mode.
            "peft>=0.21,<0.22",
            # The policy server's tests (tests/serve): its dependencies and the OpenVLA
            # REST client. openpi-client pins numpy<2; the tests install it in a venv.
            "aiohttp>=3.9,<4",
            "msgpack>=1.0",
            "json-numpy>=2.1,<3",
            "requests>=2.28",
            # tests/test_notebook.py executes notebooks/quickstart.ipynb in a real kernel.
            "nbclient>=0.9",
            "nbformat>=5.9",
            "ipykernel>=6.25",
        ],
        # --mode=serve: openpi's websocket protocol and OpenVLA's REST on one aiohttp port.
        "serve": ["aiohttp>=3.9,<4", "msgpack>=1.0", "json-numpy>=2.1,<3"],
        "hf": ["tokenizers>=0.20"],
        "tpu": ["jax[tpu]>=0.4.35,<0.13"],
        "gpu": ["jax[cuda12]>=0.4.35,<0.13"],
    },
)
