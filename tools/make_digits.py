#!/usr/bin/env python3
"""Converts the UCI handwritten digits that scikit-learn ships (1,797 images, 8x8, 17 grey levels)
into two .npy files the C++ examples read. Run once; the outputs are committed.

    python3 -m pip install numpy scikit-learn && python3 tools/make_digits.py
"""
import pathlib

import numpy as np
from sklearn.datasets import load_digits

out = pathlib.Path(__file__).resolve().parent.parent / "data"
digits = load_digits()
images = (digits.images / 16.0).astype("<f4")  # [1797, 8, 8] in [0, 1]
labels = digits.target.astype("<i8")            # [1797]
np.save(out / "digits_images.npy", images)
np.save(out / "digits_labels.npy", labels)
print(f"wrote {images.shape} images and {labels.shape} labels to {out}")
