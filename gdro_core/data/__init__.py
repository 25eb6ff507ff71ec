"""Data that crosses stages: prompt sets, rollout pools, reward tables, atomic hashed files."""
