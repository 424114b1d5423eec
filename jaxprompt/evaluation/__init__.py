"""Evaluation: task metrics (T5 definitions), rank classification and generation over a split."""
