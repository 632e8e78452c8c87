"""The real photographs bundled in the scikit-image wheel: the embedded pretraining data and the backgrounds of
the generated detection and segmentation scenes, with no download."""

from __future__ import annotations

import functools

from PIL import Image

# Real photographs that ship inside the scikit-image wheel (skimage.data loads them from its own folder; the
# other skimage.data images are either synthetic or downloaded on first use, which we never do).
# `cat` is `chelsea` again, so it is left out.
_RGB_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
_GRAY_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "text", "page", "cell",
                "microaneurysms")


@functools.cache
def embedded_photos() -> tuple[tuple[str, Image.Image], ...]:
    """The bundled photographs as (name, RGB image), read once per process."""
    import skimage.data  # only the embedded demo needs scikit-image

    photos = [(name, Image.fromarray(getattr(skimage.data, name)())) for name in _RGB_PHOTOS]
    left, right, _disparity = skimage.data.stereo_motorcycle()
    photos += [("motorcycle_left", Image.fromarray(left)), ("motorcycle_right", Image.fromarray(right))]
    # Grayscale photos are repeated over three channels so every sample has the same (3, S, S) shape.
    photos += [(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in _GRAY_PHOTOS]
    return tuple(photos)
