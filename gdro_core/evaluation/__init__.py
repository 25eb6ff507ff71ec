"""Evaluation: held-out scoring, judges, corrected score, checkpoint monitoring and curves."""
