"""gdro core library: pure, typed building blocks of offline GDRO post-training."""
