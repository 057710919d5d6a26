"""Per-frame image planes the categorizer reads, computed once per frame, and the region labels."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class FramePlanes:
    """Per-frame planes computed once: Lab (L in 0..1, a/b in -0.5..0.5) and gradient energy."""

    lab: np.ndarray
    grad: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray) -> "FramePlanes":
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
        f = image.astype(np.float32) / 255.0
        lab = cv2.cvtColor(f, cv2.COLOR_RGB2Lab)
        lab[..., 0] /= 100.0
        lab[..., 1:] /= 255.0
        gx = cv2.Sobel(lab[..., 0], cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(lab[..., 0], cv2.CV_32F, 0, 1, ksize=3)
        return cls(lab, np.sqrt(gx * gx + gy * gy))


def labels_of(mask_or_labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer labels 1..n from a label image (int) or a binary mask (bool/uint8 0/255)."""
    a = np.asarray(mask_or_labels)
    if a.dtype == bool or (a.dtype == np.uint8 and a.max(initial=0) in (1, 255) and len(np.unique(a)) <= 2):
        n, lab = cv2.connectedComponents((a > 0).astype(np.uint8), connectivity=8)
        return lab.astype(np.int32), int(n - 1)
    lab = a.astype(np.int32)
    return lab, int(lab.max(initial=0))
