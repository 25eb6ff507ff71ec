"""The GenEval task: compositional prompts, GenEval's rules over a detector, the shapes world and its pixel judge.

Parts: :mod:`.task` (``GenEvalTask``), :mod:`.prompts`, :mod:`.world` (with :mod:`.shapes`), :mod:`.rules`,
:mod:`.detectors` and :mod:`.reward`, :mod:`.judge`, and the :mod:`.report` command. This package imports
nothing itself, so a stage loads only the parts it uses.
"""
