"""Checkpoint import: big_vision `.npz`, HuggingFace safetensors, and Orbax conversion.

`safetensors.py` and `npz.py` read files into flat `{name: numpy array}` views without
copying; `mapping.py` turns such a view into a model's parameter pytree through a list
of named rules and reports every missing, unexpected or mis-shaped tensor at once.
One module per model family (`siglip.py`, `dinov2.py`, `llm.py`, `vla.py`) holds the
rules for the layouts that family is published in; C-RADIO's sit beside its model in
`vla_jax/models/teachers/radio.py`.
"""
