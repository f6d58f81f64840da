"""Offline training of deterministic actor-critics (TD3, DDPG) and export of the actor to ONNX.

Import submodules directly; `training.envs` and `training.evaluate` need no torch, so the
robot loop can use them on a serving install.
"""
