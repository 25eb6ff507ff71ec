"""The low-quality share of a world's pretraining data: some images blurred, whatever the task."""

from __future__ import annotations

import random

import numpy as np
from scipy import ndimage


def degrade(images: np.ndarray, share: float, sigma: float, rng: random.Random) -> np.ndarray:
    """Blur a random ``share`` of the images (in place, every channel): the low-quality part of the training data.

    A base that sometimes draws a blurred image for any prompt has a failure mode that reward
    training can remove everywhere, the way real web-trained models learn to avoid blurry images.
    """
    if share <= 0:
        return images
    background = float(images.min())
    for img in images:
        if rng.random() < share:
            for channel in img:
                channel[:] = ndimage.gaussian_filter(channel, sigma, mode="constant", cval=background)
    return images
