"""Tasks: what is asked of an image and how it is rewarded (OCR), with the built-in world that renders it."""
