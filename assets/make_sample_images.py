"""Regenerate assets/images/ (offline): one Fashion-MNIST test image per class, and a few photos bundled
with scikit-image. Run: .venv/bin/python assets/make_sample_images.py  (licences: assets/README.md)."""
from pathlib import Path

import numpy as np
from PIL import Image

from equishift.data import FMNIST_CLASSES, load_fashion_mnist

OUT = Path(__file__).resolve().parent / "images"
SLUGS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
PHOTOS = {"chelsea-cat": "chelsea", "coffee": "coffee", "astronaut": "astronaut", "rocket": "rocket",
          "hubble-deep-field": "hubble_deep_field"}
MAX_SIDE = 256  # small files; the dashboard resizes to the model's input anyway


def fashion_mnist_samples() -> None:
    """The first test image of each class, raw 28x28 grayscale (no padding: that is the model's step)."""
    images, labels = load_fashion_mnist("test")
    assert len(SLUGS) == len(FMNIST_CLASSES)
    for k, slug in enumerate(SLUGS):
        i = int((labels == k).nonzero()[0])
        Image.fromarray(images[i].numpy(), mode="L").save(OUT / f"fmnist-{k}-{slug}.png", optimize=True)


def photos() -> None:
    import skimage.data

    for slug, fn in PHOTOS.items():
        im = Image.fromarray(np.asarray(getattr(skimage.data, fn)())).convert("RGB")
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        im.save(OUT / f"photo-{slug}.jpg", quality=90, optimize=True)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    fashion_mnist_samples()
    photos()
