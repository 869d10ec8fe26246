"""Evaluation of frozen diffusion models: what needs a model from model/ and serves the evaluation scripts.

Layers (docs/DESIGN.md): utils/ (runtime) <- model/ (maths) <- evaluation/ <- the scripts.
"""
