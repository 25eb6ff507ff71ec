"""Tasks: what is asked of an image and how it is rewarded (OCR, GenEval), with the built-in world that renders it.

Each task is a package with the same parts: ``task`` (the :class:`~gdro_core.tasks.base.Task`), ``prompts``,
``world``, ``reward`` and ``judge``. The protocol is :mod:`gdro_core.tasks.base`; the flows build a task by name
through :mod:`gdro_core.tasks.registry`. This package imports nothing, so that importing one part of one task
loads only that part.
"""
