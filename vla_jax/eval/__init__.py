"""Evaluation and representation analysis: closed-loop success, open-loop metrics, probes,
attention maps and t-SNE of a trained VLA (see the modules' docstrings)."""
