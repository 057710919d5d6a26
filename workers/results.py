"""What a defect frame's result carries besides the verdict: categories and images (mask,
thumbnail, heat map)."""

from __future__ import annotations

import logging

import cv2
import numpy as np

from linewatch.inspection.categorize import categorize_frame
from linewatch.inspection.frames import FrameError
from linewatch.inspection.verdict import FrameVerdict, _warn_once
from linewatch.profiles import Profile

log = logging.getLogger(__name__)


def heatmap_bgr(amap: np.ndarray, threshold: float) -> np.ndarray:
    """JET colour map with the threshold at mid-scale (so red = well above threshold)."""
    if threshold > 0:
        scaled = amap * (128.0 / threshold)
    else:
        lo, hi = float(amap.min()), float(amap.max())
        scaled = (amap - lo) * (255.0 / max(hi - lo, 1e-6))
    return cv2.applyColorMap(np.clip(scaled, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)


def render_artifacts(image_rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray, threshold: float,
                     size: int) -> tuple[bytes, bytes, bytes]:
    """(mask PNG, thumbnail JPEG, heat map PNG): mask and thumbnail at most ``size`` pixels on
    a side, the heat map at most ``size // 2`` (it is a blurred map; a smaller PNG costs a third
    of the deflate time, which dominated post-processing of defect frames)."""
    def fit(img: np.ndarray, side: int, interp: int) -> np.ndarray:
        # a view keeps its aspect ratio; its longer side is bounded (a tiled view is larger than a tile)
        h, w = img.shape[:2]
        if max(h, w) <= side:
            return img
        scale = side / max(h, w)
        return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)

    ok1, mask_png = cv2.imencode(".png", fit(mask, size, cv2.INTER_NEAREST), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    thumb = cv2.cvtColor(fit(image_rgb, size, cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    ok2, thumb_jpg = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
    small_map = fit(amap, max(32, size // 2), cv2.INTER_AREA)
    ok3, heat_png = cv2.imencode(".png", heatmap_bgr(small_map, threshold), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not (ok1 and ok2 and ok3):
        raise FrameError("other", "could not encode result images")
    return mask_png.tobytes(), thumb_jpg.tobytes(), heat_png.tobytes()


def categorize(profile: Profile, image_rgb: np.ndarray, amap: np.ndarray, fv: FrameVerdict) -> tuple[str, float]:
    """Fill region categories and return the frame's (category, confidence); "unknown" when the
    profile has no categorizer or categorisation fails (never drops the frame)."""
    if profile.categorizer is None or not fv.regions:
        return "unknown", 0.0
    try:
        out = categorize_frame(image_rgb, amap, fv.labels, profile.categorizer, threshold=profile.threshold,
                               background=profile.background, regions=fv.regions)
    except Exception as exc:  # a categoriser bug must not lose the inspection
        _warn_once(f"categorize:{profile.product}:{profile.version}",
                   "categorisation failed for %s v%s: %s", profile.product, profile.version, exc)
        return "unknown", 0.0
    fv.regions = out.regions
    return out.category, out.confidence
