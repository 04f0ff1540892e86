"""Pure flax.linen model definitions: vision towers, the decoder LM, the VLA and its aligner.

Modules here do no I/O: they take arrays and a typed config and return arrays plus an
`out` dict of named intermediates. Checkpoint import lives in `vla_jax.weights`, except
that a teacher family (`models/teachers/`) names its loaders, and a family added since
(C-RADIO, DINOv3, SigLIP 2: `teachers/radio.py`, `teachers/dinov3.py`,
`teachers/siglip2.py`) keeps its loader beside its model, big_vision style.
"""
