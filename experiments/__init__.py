"""Experiments of issue 13: base vs SFT vs DPO vs IOPO (+ ablations) and GRPO vs SegPO on complex-IF data."""
