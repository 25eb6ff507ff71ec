"""The OCR task: quoted-text prompts, Flow-GRPO's OCR reward, the text-rendering world and its pixel judge.

Parts: :mod:`.task` (``OcrTask``), :mod:`.prompts`, :mod:`.world`, :mod:`.reader` and :mod:`.reward`,
:mod:`.judge`. This package imports nothing itself, so a stage loads only the parts it uses.
"""
