"""A JAX-native tabletop pick-and-place benchmark with the paper's OOD splits.

"Put the {object} on the {receptacle}": an end effector (xyz, yaw, gripper) moves over a
table seen by a fixed oblique camera, grasps an object and releases it on a target
receptacle. Everything on the hot path is pure `jax.numpy` (reset, step, render, the
scripted expert), so thousands of environments run vmapped and jitted on any device.
Modules: `catalogue` (named content and splits), `render`, `env` (state, reset, step,
actions), `expert`, `rollout` (policy interface), `demos` (RLDS export), `bundled`
(the cached default dataset), `gallery` (pictures).
"""
