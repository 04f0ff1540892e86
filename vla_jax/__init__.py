"""vla_jax: fine-tune vision-language-action models in JAX without blinding them.

The package implements Visual Representation Alignment (Kachaev et al., 2025): during
fine-tuning, the student VLA's mid-layer hidden states at the visual-token positions are
pulled toward a frozen vision teacher's patch features. See README.md for the tour.
"""

__version__ = "0.1.0"
