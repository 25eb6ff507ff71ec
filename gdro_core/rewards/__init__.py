"""Rewards: what scores an image, found by name, summed with weights (``rewards`` in params.yaml).

:mod:`.base` is the protocol a reward implements, :mod:`.registry` finds rewards by name (built-in, the
``gdro.rewards`` entry point, or ``module:Class``), and :mod:`.weighted` sums several into one table.
"""
