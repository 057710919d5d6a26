"""Recalibration from operators' reviews: the reviewed frames kept as evidence become an
image-labelled validation set, which goes through the image-label calibration path
(``calibration.workflow.threshold_model``) like any folder of labelled images.

Labels (the latest review of a frame counts, ``latest_reviews``): a confirmed defect is an
anomalous image with the category the operator gave; a false call is a normal image; a sampled
normal frame (kept by ``evidence.normal_sample_rate``, not reviewed) is a normal image; an
``unsure`` review is left out. A reviewed frame whose original has expired is counted and
skipped. The old profile and the new threshold are scored on the same set, so the comparison is
like for like; publishing records which reviews were used (in the new version's
``calibration_metrics["from_reviews"]``), so a version's history says what it was calibrated from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import LabelledSet
from calibration.frame_kpis import frame_kpis
from calibration.thresholds import METHODS, MIN_ANOMALOUS, ThresholdReport
from calibration.workflow import publish_recalibrated, recalibrated_profile, served_model, threshold_model
from linewatch import store
from linewatch.errors import UserError
from linewatch.inspection.extent import ExtentModel
from linewatch.inspection.frames import FrameError, decode_frame, framing_of
from linewatch.inspection.geometry import Framing
from linewatch.inspection.verdict import inspect_images
from linewatch.profiles import Profile, Registry

MIN_CONFIRMED = MIN_ANOMALOUS  # the image-label path's own floor for defective validation images
MIN_NORMAL = 10  # normal frames (false calls + sampled normals): below this a score quantile is noise

_ROWS_SQL = """
SELECT e.frame_id, e.file, e.sha256, e.encoding, e.reason, e.capture_ts_ms, r.review_id, r.verdict, r.category
FROM evidence e
LEFT JOIN latest_reviews r ON r.frame_id = e.frame_id
WHERE e.product = ? AND (
      (r.frame_id IS NOT NULL AND r.reviewed_ts_ms >= ? AND r.verdict IN ('confirm', 'false_call'))
   OR (r.frame_id IS NULL AND e.reason = 'sample' AND e.capture_ts_ms >= ?))
ORDER BY e.capture_ts_ms, e.frame_id
"""
_EXPIRED_SQL = """
SELECT count(*) FROM latest_reviews r
WHERE r.product = ? AND r.reviewed_ts_ms >= ? AND r.verdict IN ('confirm', 'false_call')
  AND NOT EXISTS (SELECT 1 FROM evidence e WHERE e.frame_id = r.frame_id)
"""


@dataclass
class ReviewedSet:
    """The validation set and what it was made of."""

    val: LabelledSet
    review_ids: list[str] = field(default_factory=list)
    confirmed: int = 0
    false_calls: int = 0
    sampled_normals: int = 0
    expired: int = 0  # reviewed frames whose original is gone (not used)

    def summary(self) -> dict[str, Any]:
        return {"confirmed": self.confirmed, "false_calls": self.false_calls, "sampled_normals": self.sampled_normals,
                "expired": self.expired, "review_ids": list(self.review_ids)}


def load_reviewed_set(db: Path, product: str, size: int | Framing, *, since_ms: int = 0, evidence_dir: Path | None = None,
                      max_pixels: int = 64_000_000) -> ReviewedSet:
    """Build the set; raises UserError (one line, exit 2) when either kind is too thin."""
    with store.reading(db) as con:
        rows = con.execute(_ROWS_SQL, [product, since_ms, since_ms]).fetchall()
        expired = int(con.execute(_EXPIRED_SQL, [product, since_ms]).fetchone()[0])
    root = store.evidence_root(db, evidence_dir)
    paths, images, cats, labels, ids = [], [], [], [], []
    out = ReviewedSet(val=None, expired=expired)  # type: ignore[arg-type]
    for frame_id, file, sha, enc, reason, ts, review_id, verdict, category in rows:
        ev = store.evidence.load_file(root, frame_id, file, sha, enc, reason, ts)
        if ev is None:
            out.expired += int(review_id is not None)
            continue
        try:
            img, _, _ = decode_frame(ev.data, size, max_pixels, enc)
        except FrameError:
            continue
        defect = verdict == "confirm"
        paths.append(root / file)
        images.append(img)
        cats.append(category if defect else "good")
        labels.append(defect)
        if review_id is not None:
            ids.append(review_id)
            out.confirmed += int(defect)
            out.false_calls += int(not defect)
        else:
            out.sampled_normals += 1
    normals = out.false_calls + out.sampled_normals
    if out.confirmed < MIN_CONFIRMED or normals < MIN_NORMAL:
        since = f" since {since_ms} ms" if since_ms else ""
        raise UserError(
            f"{product}: too few reviews to recalibrate{since}: {out.confirmed} confirmed defect(s) (need "
            f"{MIN_CONFIRMED}) and {normals} normal frame(s) (false calls + sampled normal frames, need {MIN_NORMAL})"
            + (f"; {out.expired} reviewed frame(s) no longer kept" if out.expired else ""))
    n = len(images)
    out.val = LabelledSet(paths=paths, images=np.stack(images), masks=np.zeros((n, *framing_of(size).view_hw), bool),
                          categories=cats, labels=np.asarray(labels, bool), mask_known=~np.asarray(labels, bool))
    out.review_ids = ids
    return out


@dataclass
class Recalibration:
    """Old vs new on the reviewed set, and the new version when it was published."""

    product: str
    current: Profile
    new: Profile
    report: ThresholdReport
    reviewed: ReviewedSet
    old_kpis: dict[str, Any]
    new_kpis: dict[str, Any]
    published: Profile | None = None

    def table(self) -> str:
        from calibration.frame_kpis import format_kpi

        c, n = self.current, self.new
        rows = [("profile", f"v{c.version} ({c.threshold_method})", "new" if self.published is None
                 else f"v{self.published.version} ({n.threshold_method})"),
                ("pixel threshold", f"{c.threshold:.6g}", f"{n.threshold:.6g}"),
                ("image threshold", f"{c.effective_image_threshold:.6g}", f"{n.effective_image_threshold:.6g}")]
        for k in ("escape_rate", "false_reject_rate"):
            label = k.replace("_", " ")
            rows.append((label, format_kpi(k, self.old_kpis[k]).removeprefix(label).strip(" :"),
                         format_kpi(k, self.new_kpis[k]).removeprefix(label).strip(" :")))
        w = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{'':{w}}  {'now':{w1}}  recalibrated"] + [f"{a:{w}}  {b:{w1}}  {d}" for a, b, d in rows]
        r = self.reviewed
        lines.append(f"reviewed set: {r.confirmed} confirmed defects, {r.false_calls} false calls, "
                     f"{r.sampled_normals} sampled normal frames ({len(r.review_ids)} reviews"
                     + (f"; {r.expired} reviewed frames no longer kept" if r.expired else "") + ")")
        return "\n".join(lines)


def recalibrate_from_reviews(db: Path, registry_dir: Path, product: str, *, since_ms: int = 0,
                             publish: bool = False, evidence_dir: Path | None = None, method: str | None = None,
                             target_escape_rate: float | None = None, created_by: str | None = None) -> Recalibration:
    """Recalibrate ``product``'s current profile on its reviewed frames; publish only when asked."""
    reg = Registry(registry_dir)
    current = reg.read_profile(product)
    # the counts first: too few reviews is said before any model is loaded
    reviewed = load_reviewed_set(Path(db), product, current.framing, since_ms=since_ms, evidence_dir=evidence_dir)
    current, bare = reg.load(product)
    model = served_model(current, bare)
    val = reviewed.val
    prefer = method or (current.threshold_method if current.threshold_method in METHODS else "iou")
    report, _ = threshold_model(model, val, prefer, choose_setting=False, target_escape_rate=target_escape_rate)
    raw, scores = model.predict(val.images)
    extent = ExtentModel.from_params(current.extent) if current.extent else None
    old = inspect_images(val.images, raw, scores, current, extent)
    old_kpis = frame_kpis([v.verdict == "defect" for v in old], val.anomalous)
    new = recalibrated_profile(current, model, report, {"from_reviews": {**reviewed.summary(), "since_ms": since_ms}},
                               f"recalibrated from v{current.version} on {len(val)} reviewed frames")
    new_extent = ExtentModel.from_params(new.extent) if new.extent else None
    fresh = inspect_images(val.images, raw, scores, new, new_extent)
    new_kpis = frame_kpis([v.verdict == "defect" for v in fresh], val.anomalous)
    new = new.model_copy(update={"calibration_metrics": {**new.calibration_metrics, "frame_kpis": new_kpis,
                                                         "frame_kpis_before": old_kpis},
                                 **({"created_by": created_by} if created_by else {})})
    out = Recalibration(product, current, new, report, reviewed, old_kpis, new_kpis)
    if publish:
        out.published = publish_recalibrated(reg, current, new)
    return out
