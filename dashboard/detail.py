"""The defect detail view: one frame in full, with its overlays, regions, scores, provenance,
review history and the review form.

Reached from the gallery's "Details" buttons or a frame id typed in the sidebar; the frame id is
kept in the page URL (``?frame=…``), so a detail view can be linked and reloaded. Previous /
next walk the defect frames of the current filters in the gallery's order. The original frame
comes from the evidence the sink keeps (``linewatch.store.read_evidence``); when retention
removed it, or it was never kept, the stored thumbnail stands in and the page says so.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import queries
from dashboard.format import fmt_ms, fmt_ts
from dashboard.reviews import ReviewDesk, publish
from linewatch import store
from linewatch.messages import CATEGORIES

VERDICT_LABELS = {"confirm": "Confirm defect", "false_call": "False call", "unsure": "Unsure (second look)"}


def compose(frame: bytes | None, mask: bytes | None, heatmap: bytes | None, show_mask: bool,
            show_heat: bool) -> np.ndarray | None:
    """The frame (RGB) with the mask outline and/or the heat map blended over it, each scaled
    to the frame's size (the worker stores them at thumbnail size)."""
    if not frame:
        return None
    img = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    if show_heat and heatmap:
        hm = cv2.imdecode(np.frombuffer(heatmap, np.uint8), cv2.IMREAD_COLOR)
        if hm is not None:
            img = cv2.addWeighted(img, 0.55, cv2.resize(hm, (w, h), interpolation=cv2.INTER_LINEAR), 0.45, 0)
    if show_mask and mask:
        m = cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_GRAYSCALE)
        if m is not None:
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours((m > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, contours, -1, (0, 255, 255), max(1, round(w / 200)))
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _go(frame_id: str | None) -> None:
    if frame_id:
        st.query_params["frame"] = frame_id
    else:
        st.query_params.pop("frame", None)
    st.rerun()


def _reviewer_default(settings) -> str:
    """The signed-in user from the authenticating proxy's header, when one is configured."""
    name = settings.dashboard.reviewer_header
    if not name:
        return ""
    try:
        return (st.context.headers.get(name) or "").strip()
    except Exception:  # no request context (tests run the functions bare)
        return ""


def _review_form(settings, d: dict, db: Path) -> None:
    st.subheader("Review")
    desk: ReviewDesk = st.session_state.setdefault("review_desk", ReviewDesk())
    proxy_user = _reviewer_default(settings)
    with st.form(key=f"review-{d['frame_id']}", clear_on_submit=False, border=True):
        reviewer = st.text_input("Reviewer (required)", value=proxy_user, disabled=bool(proxy_user),
                                 key=f"reviewer-{d['frame_id']}",
                                 help="your name; set by the sign-in proxy when there is one")
        verdict = st.radio("Verdict", list(VERDICT_LABELS), format_func=VERDICT_LABELS.get, horizontal=True,
                           key=f"verdict-{d['frame_id']}")
        current = d["category"] if d["category"] in CATEGORIES else CATEGORIES[0]
        category = st.selectbox("Category (for a confirmed defect)", list(CATEGORIES),
                                index=list(CATEGORIES).index(current), key=f"category-{d['frame_id']}",
                                format_func=lambda c: queries.CATEGORY_LABELS[c])
        note = st.text_input("Note (optional)", key=f"note-{d['frame_id']}")
        sent = st.form_submit_button("Submit review", type="primary")
    if sent:
        with store.reading(db, timeout_s=5.0) as con:  # the frame must exist: checked here, and again by the sink
            row = con.execute("SELECT product FROM inspections WHERE frame_id = ?", [d["frame_id"]]).fetchone()
        out = desk.submit(frame_id=d["frame_id"], product=row[0] if row else None, verdict=verdict,
                          category=category, reviewer=proxy_user or reviewer, note=note,
                          send=lambda r: publish(settings, r))
        st.session_state[f"review-outcome-{d['frame_id']}"] = (out.level, out.message)
    shown = st.session_state.get(f"review-outcome-{d['frame_id']}")
    if shown:
        level, message = shown
        {"success": st.success, "info": st.info}.get(level, st.error)(message)
    if desk.unsent is not None and desk.unsent.frame_id == d["frame_id"]:
        st.warning(f"Not yet sent: {VERDICT_LABELS[desk.unsent.verdict]} by {desk.unsent.reviewer}. "
                   "Submit again to retry.", icon=":material/schedule_send:")


def render_detail(db: Path, settings, filters: queries.Filters, frame_id: str) -> None:
    """The detail page of ``frame_id`` (a clear message when the database has no such frame)."""
    if st.button("← Back to the overview", key="detail-back"):
        _go(None)
    try:
        with store.reading(db, timeout_s=5.0) as con:
            d = queries.frame_detail(con, frame_id)
            newer, older, k, n = queries.neighbours(con, filters, frame_id) if d else (None, None, 0, 0)
    except (store.DatabaseMissing, store.StoreBusy) as exc:
        st.info(f"The database is not readable right now ({exc}); retrying on the next refresh.")
        return
    if d is None:
        st.error(f"No frame {frame_id!r} in the database.", icon=":material/search_off:")
        return
    st.header(f"Frame {d['frame_id']}")
    nav = st.columns([1, 1, 4])
    if nav[0].button("← Newer", disabled=newer is None, key="detail-newer"):
        _go(newer)
    if nav[1].button("Older →", disabled=older is None, key="detail-older"):
        _go(older)
    nav[2].caption(f"defect {k} of {n} in the current filters" if k else
                   "not among the defects of the current filters")
    left, right = st.columns([3, 2])
    with left:
        t = st.columns(2)
        show_mask = t[0].toggle("Mask outline", value=True, key="show-mask")
        show_heat = t[1].toggle("Heat map", value=False, key="show-heat")
        original = None
        if d["evidence"] is not None:
            ev = store.evidence.load_file(store.evidence_root(db, settings.evidence.dir), d["frame_id"], *d["evidence"])
            original = ev.data if ev else None
        picture = compose(original or d["thumbnail"], d["mask"], d["heatmap"], show_mask, show_heat)
        if picture is not None:
            what = "original frame" if original else "thumbnail (the original frame was not kept or has expired)"
            st.image(picture, caption=f"{what} · {picture.shape[1]}×{picture.shape[0]}", width="stretch")
        else:
            st.caption("(no image stored for this frame)")
    with right:
        verdict = "DEFECT" if d["verdict"] == "defect" else "ok"
        st.markdown(f"**{verdict}** · {d['product']} · {d['camera']} · {d['line']} · {fmt_ts(d['capture_ts_ms'])}")
        a, b = st.columns(2)
        a.metric("Image score", f"{d['image_score']:.4f}", border=True,
                 delta=f"{d['image_score'] - d['image_threshold']:+.4f} vs threshold", delta_color="inverse")
        b.metric("Image threshold", f"{d['image_threshold']:.4f}", border=True,
                 help=f"pixel threshold {d['threshold']:.4f}")
        cat = queries.CATEGORY_LABELS.get(d["category"] or "unknown", d["category"]).split(" —")[0]
        st.markdown(f"Category **{cat}** ({(d['category_confidence'] or 0):.0%}) · {d['region_count']} region(s), "
                    f"{(d['defect_area_frac'] or 0):.1%} of the frame")
        st.caption(f"Profile v{d['profile_version']} ({d['model_kind']}) · engine {d['engine']} · worker "
                   f"{d['worker_id']}")
        st.caption(f"Latency: capture → result {fmt_ms(d['latency_ms'])} · inference {fmt_ms(d['inference_ms'])} · "
                   f"capture → stored {fmt_ms(d['stored_ts_ms'] - d['capture_ts_ms'])}")
        if not d["regions"].empty:
            st.dataframe(d["regions"], hide_index=True, width="stretch",
                         column_config={"confidence": st.column_config.NumberColumn("Confidence", format="%.2f"),
                                        "area_frac": st.column_config.NumberColumn("Area", format="%.3f")})
        if not d["reviews"].empty:
            st.markdown("**Reviews** (the newest counts)")
            st.dataframe(d["reviews"].drop(columns=["review_id"]), hide_index=True, width="stretch",
                         key="review-history",
                         column_config={"reviewed": st.column_config.DatetimeColumn("When", format="YYYY-MM-DD HH:mm:ss")})
        _review_form(settings, d, db)


def review_panel(snap_stats: pd.DataFrame) -> None:
    """Per product: how many defect calls were reviewed, confirmed precision, category agreement."""
    st.subheader("Reviews of defect calls")
    if snap_stats.empty:
        st.caption("No defect calls in this range.")
        return
    st.dataframe(snap_stats, hide_index=True, width="stretch", key="review-stats", column_config={
        "product": "Product", "defect_calls": "Defect calls", "reviewed": "Reviewed",
        "reviewed_share": st.column_config.NumberColumn("Reviewed share", format="percent"),
        "confirmed": "Confirmed", "false_calls": "False calls", "unsure": "Unsure",
        "confirmed_precision": st.column_config.NumberColumn("Confirmed precision", format="percent",
                                                             help="confirmed / (confirmed + false calls)"),
        "category_agreement": st.column_config.NumberColumn("Category agreement", format="percent",
                                                            help="confirmed with the category the worker named"),
    })
