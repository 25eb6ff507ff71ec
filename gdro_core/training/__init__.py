"""Training loops: offline GDRO and baselines, the online Flow-GRPO baseline, base pretraining, checkpoints."""
