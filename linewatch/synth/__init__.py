"""The synthetic production line: products, normal variation and defects with exact masks.

Why it exists: the demo, the tests and the calibration study need a line whose defects are
known to the pixel, in every product-agnostic category, with and without background, and
whose normal variation (position, rotation, lighting, texture) is large enough that a trivial
detector (|image - mean normal image|, blurred) does not win, while the defects stay visible
to a pretrained-CNN patch model at 256 x 256.

Everything is deterministic by ``(seed, product, kind, index)``: each sample draws from its own
``numpy.random.Generator``, so sample 17 is the same whether or not samples 0..16 were made.
Rendering is vectorised numpy/OpenCV on float32 planes (a few ms per 256 x 256 image).

Three modules, bottom-up:

- ``scenes``: the product specs (``PRODUCTS``), the material helpers and a renderer per
  product kind, plus the final lighting and sensor noise;
- ``defects``: the defect painters of each base category (``STRUCTURAL``, ``SURFACE``,
  ``CONTAMINATION``) and the compositing of a scene;
- ``line``: ``SyntheticProduct`` (one product's normal and defective frames), the endless
  ``SyntheticCamera`` and ``generate_dataset`` (the MVTec AD layout on disk);
- ``frame``: the frame mode -- the product's square in a larger camera frame (e.g. 1024x768)
  on a dark backdrop, with defects sized as the model sees them or as a camera does.
"""

from linewatch.synth.frame import DEFECT_SCALES, FrameLayout, default_product_size, parse_frame_size
from linewatch.synth.line import SynthSample, SyntheticCamera, SyntheticProduct, generate_dataset
from linewatch.synth.scenes import BASE_CATEGORIES, DEFAULT_PRODUCTS, DEFECT_SCALE, PRODUCTS, ProductSpec

__all__ = [
    "BASE_CATEGORIES",
    "DEFAULT_PRODUCTS",
    "DEFECT_SCALE",
    "DEFECT_SCALES",
    "FrameLayout",
    "PRODUCTS",
    "ProductSpec",
    "SynthSample",
    "SyntheticCamera",
    "SyntheticProduct",
    "default_product_size",
    "generate_dataset",
    "parse_frame_size",
]
