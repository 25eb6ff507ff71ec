"""Objectives: implicit reward, group losses, timestep sampling and the online baseline's maths."""
