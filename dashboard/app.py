"""linewatch dashboard: what a plant manager needs to see about the line, at a glance.

Run with `linewatch dashboard` (or ``streamlit run dashboard/app.py -- --db PATH``). The page
reads the sink's DuckDB file read-only through dashboard.queries, once per refresh, and
lays it out: alerts first, then defects by category, the trend, the breakdowns, the latest
defects, profiles in force and pipeline health. It never holds the database open between
refreshes (the sink needs the write lock) and never shows a lock error: when the database is
busy it keeps showing the previous numbers and says how old they are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import queries
from dashboard.detail import render_detail, review_panel
from dashboard.format import ago, fmt_ms, fmt_ts
from linewatch import store

TIME_RANGES: dict[str, int | None] = {
    "15 min": 15 * 60_000,
    "1 hour": 3600_000,
    "8 hours": 8 * 3600_000,
    "24 hours": 24 * 3600_000,
    "7 days": 7 * 24 * 3600_000,
    "All time": None,
}
DEFAULT_RANGE = "1 hour"
CATEGORY_COLORS = {  # chart colours; CATEGORY_MD is the same palette in Streamlit markdown
    "structural": "#d62728",
    "surface": "#ff7f0e",
    "contamination": "#1f77b4",
    "combined": "#9467bd",
    "unknown": "#7f7f7f",
}
CATEGORY_MD = {"structural": "red", "surface": "orange", "contamination": "blue", "combined": "violet",
               "unknown": "gray"}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--db", type=Path)
    p.add_argument("--refresh", type=int)
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def _settings():
    from linewatch.settings import load_settings

    return load_settings()


def annotate(thumbnail: bytes | None, mask: bytes | None, heatmap: bytes | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(frame with the mask outline drawn, heat map blended over the frame) as RGB arrays."""
    if not thumbnail:
        return None, None
    frame = cv2.imdecode(np.frombuffer(thumbnail, np.uint8), cv2.IMREAD_COLOR)
    if frame is None:
        return None, None
    h, w = frame.shape[:2]
    outlined = frame.copy()
    if mask:
        m = cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_GRAYSCALE)
        if m is not None:
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours((m > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(outlined, contours, -1, (0, 255, 255), max(1, round(w / 128)))
    overlay = None
    if heatmap:
        hm = cv2.imdecode(np.frombuffer(heatmap, np.uint8), cv2.IMREAD_UNCHANGED)
        if hm is not None:
            if hm.ndim == 2:
                hm = cv2.applyColorMap(cv2.normalize(hm, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8),
                                       cv2.COLORMAP_JET)
            elif hm.shape[2] == 4:
                hm = cv2.cvtColor(hm, cv2.COLOR_BGRA2BGR)
            hm = cv2.resize(hm, (w, h), interpolation=cv2.INTER_LINEAR)
            overlay = cv2.addWeighted(frame, 0.55, hm, 0.45, 0)
    rgb = lambda a: None if a is None else cv2.cvtColor(a, cv2.COLOR_BGR2RGB)  # noqa: E731
    return rgb(outlined), rgb(overlay)


def _open_typed_frame() -> None:
    """The sidebar's frame id opens its detail view; the box is emptied (a callback runs before
    the page, where a widget's value may still change), so "Back" does not reopen it."""
    wanted = (st.session_state.get("f_open_frame") or "").strip()
    if wanted:
        st.query_params["frame"] = wanted
    st.session_state["f_open_frame"] = ""


def _sidebar(options: dict[str, list[str]], refresh_s: int, db: Path) -> tuple[queries.Filters, int | None]:
    st.sidebar.title("linewatch")
    st.sidebar.caption("Visual inspection — line quality")
    rng = st.sidebar.radio("Time range", list(TIME_RANGES), index=list(TIME_RANGES).index(DEFAULT_RANGE),
                           key="time_range", horizontal=False)
    products = st.sidebar.multiselect("Product", options.get("product", []), key="f_products",
                                      placeholder="All products")
    cameras = st.sidebar.multiselect("Camera", options.get("camera", []), key="f_cameras",
                                     placeholder="All cameras")
    lines = st.sidebar.multiselect("Line", options.get("line", []), key="f_lines", placeholder="All lines")
    st.sidebar.text_input("Open a frame id", key="f_open_frame", placeholder="frame id, then Enter",
                          on_change=_open_typed_frame)
    st.sidebar.divider()
    st.sidebar.caption(f"Auto-refresh every {refresh_s} s · times in UTC")
    st.sidebar.caption(f"Database: `{db}`")
    return queries.Filters(products=products, cameras=cameras, lines=lines), TIME_RANGES[rng]


def _window(base: queries.Filters, span_ms: int | None) -> queries.Filters:
    """The filters with the time window recomputed now, so each auto-refresh slides it."""
    now = int(time.time() * 1000)
    return base.model_copy(update={"start_ms": None if span_ms is None else now - span_ms, "end_ms": None})


def _alerts(snap: queries.Snapshot) -> None:
    for a in snap.alerts:
        if a["kind"] == "drift":
            st.warning(f"**{a['product']} · scores drifting: recalibrate?** KS distance {a['value']:.2f} (limit "
                       f"{a['limit']:.2f}) — {a['message']} · since {fmt_ts(a['ts_ms'])}", icon=":material/trending_up:")
            continue
        what = "Defect rate" if a["kind"] == "defect_rate" else "Consecutive defects"
        value = f"{a['value']:.1%}" if a["kind"] == "defect_rate" else f"{a['value']:.0f} in a row"
        limit = f"{a['limit']:.1%}" if a["kind"] == "defect_rate" else f"{a['limit']:.0f}"
        st.error(f"**ALERT · {a['product']} · {what}: {value}** (limit {limit}) — {a['message']} "
                 f"· since {fmt_ts(a['ts_ms'])}", icon=":material/notifications_active:")


def _kpis(snap: queries.Snapshot) -> None:
    k, h = snap.kpis, snap.health
    cols = st.columns(5)
    cols[0].metric("Frames inspected", f"{k['frames']:,}", border=True)
    cols[1].metric("Defective frames", f"{k['defects']:,}", border=True)
    cols[2].metric("Defects per 1000 frames", f"{k['per_1000']:.1f}", border=True)
    cols[3].metric("Throughput, last minute", f"{h['frames_per_s']:.1f} fr/s", border=True,
                   help="frames written to the database per second over the last 60 s (all products)")
    last = h["last_capture_ts_ms"]
    cols[4].metric("Last frame", ago(last, snap.read_ts_ms), border=True, help=fmt_ts(last))


def _categories(snap: queries.Snapshot) -> None:
    st.subheader("Defects by category")
    cats = snap.categories
    cols = st.columns(len(cats))
    for col, row in zip(cols, cats.itertuples()):
        with col.container(border=True, key=f"cat-{row.category}"):
            st.markdown(f":{CATEGORY_MD.get(row.category, 'gray')}[■] **{row.label}**")
            st.metric(row.label, f"{row.defects:,}", label_visibility="collapsed",
                      help=queries.CATEGORY_HELP.get(row.category, ""))
            st.caption(f"{row.per_1000:.1f} per 1000 frames · {row.share:.0%} of defects")


def _trend_frame(snap: queries.Snapshot) -> pd.DataFrame:
    """Every bucket from the first to now (gaps are shown as gaps, not squeezed out), with
    a short UTC label for the axis."""
    df = snap.trend.copy()
    step = pd.Timedelta(seconds=snap.bucket_s)
    first = df["bucket"].min()
    last = max(df["bucket"].max(), pd.Timestamp(snap.read_ts_ms, unit="ms").floor(step))
    every = pd.DataFrame({"bucket": pd.date_range(first, last, freq=step)})
    fmt = "%m-%d %H:%M" if (last - first) >= pd.Timedelta(days=1) else "%H:%M"
    every["label"] = every["bucket"].dt.strftime(fmt)
    return every.merge(df, on="bucket", how="left")


def _trend(snap: queries.Snapshot) -> None:
    import altair as alt

    bucket = snap.bucket_s
    unit = f"{bucket // 3600} h" if bucket >= 3600 else f"{bucket // 60} min" if bucket >= 60 else f"{bucket} s"
    st.subheader(f"Trend — defects per {unit}")
    if snap.trend.empty or snap.trend["defects"].sum() == 0:
        st.info("No defects in this time range.")
        return
    df = _trend_frame(snap)
    labels = list(dict.fromkeys(df["label"]))
    axis = alt.Axis(labelAngle=0, labelOverlap=True, title=None)
    cats = [c for c in queries.ALL_CATEGORIES if c in set(df["category"].dropna())]
    names = [queries.CATEGORY_LABELS[c].split(" —")[0] for c in cats]
    bars_df = df[df["category"].isin(cats)].assign(
        name=lambda d: d["category"].map(lambda c: queries.CATEGORY_LABELS[c].split(" —")[0]))
    bars = alt.Chart(bars_df).mark_bar().encode(
        x=alt.X("label:O", sort=labels, axis=axis, scale=alt.Scale(domain=labels)),
        y=alt.Y("sum(defects):Q", title="defective frames"),
        color=alt.Color("name:N", title=None, scale=alt.Scale(domain=names,
                        range=[CATEGORY_COLORS[c] for c in cats]), legend=alt.Legend(orient="bottom")),
        order=alt.Order("category:N"),
        tooltip=[alt.Tooltip("label:O", title="from (UTC)"), alt.Tooltip("name:N", title="category"),
                 alt.Tooltip("sum(defects):Q", title="defects")],
    ).properties(height=260)
    rate_df = (df.groupby("label", sort=False).agg(defects=("defects", "sum"), frames=("frames", "first"))
               .reset_index())
    rate_df["per_1000"] = 1000 * rate_df["defects"] / rate_df["frames"]
    rate = alt.Chart(rate_df).mark_line(color="#d62728", point=alt.OverlayMarkDef(color="#d62728")).encode(
        x=alt.X("label:O", sort=labels, axis=axis, scale=alt.Scale(domain=labels)),
        y=alt.Y("per_1000:Q", title="defects per 1000 frames"),
        tooltip=[alt.Tooltip("label:O", title="from (UTC)"), alt.Tooltip("per_1000:Q", format=".0f"),
                 alt.Tooltip("frames:Q", title="frames")],
    ).properties(height=260)
    left, right = st.columns([3, 2])
    left.altair_chart(bars, width="stretch")
    right.altair_chart(rate, width="stretch")


def _breakdowns(snap: queries.Snapshot) -> None:
    st.subheader("By product, camera and line")
    cols = st.columns(3)
    for col, (name, df) in zip(cols, (("product", snap.by_product), ("camera", snap.by_camera),
                                      ("line", snap.by_line))):
        with col:
            if df.empty:
                st.caption(f"No frames for any {name} in this range.")
                continue
            top = float(df["per_1000"].max() or 1.0)
            st.dataframe(
                df.drop(columns=["last_frame"]), hide_index=True, width="stretch",
                column_config={
                    name: st.column_config.TextColumn(name.capitalize(), width="small"),
                    "frames": st.column_config.NumberColumn("Frames", format="%d", width="small"),
                    "defects": st.column_config.NumberColumn("Defects", format="%d", width="small"),
                    "per_1000": st.column_config.ProgressColumn("Per 1000", format="%.0f", min_value=0,
                                                                max_value=max(top, 1.0), width="small"),
                    "top_category": st.column_config.TextColumn("Top defect", width="small"),
                },
            )


def _gallery(snap: queries.Snapshot) -> None:
    st.subheader("Latest defects")
    if not snap.gallery:
        st.info("No defects in this time range — nothing to show here.")
        return
    per_row = 4
    for start in range(0, len(snap.gallery), per_row):
        cols = st.columns(per_row)
        for col, d in zip(cols, snap.gallery[start:start + per_row]):
            with col.container(border=True):
                outlined, overlay = annotate(d["thumbnail"], d["mask"], d["heatmap"])
                if outlined is not None:
                    a, b = st.columns(2)
                    a.image(outlined, caption="defect outline", width="stretch")
                    if overlay is not None:
                        b.image(overlay, caption="heat map", width="stretch")
                else:
                    st.caption("(no image stored for this frame)")
                label = queries.CATEGORY_LABELS.get(d["category"], d["category"]).split(" —")[0]
                conf = f" ({d['confidence']:.0%})" if d["category"] != "unknown" and d["confidence"] else ""
                st.markdown(f"**{label}**{conf} · score **{d['score']:.3f}** (thr {d['threshold']:.3f})")
                st.caption(f"{d['product']} · {d['camera']} · {d['line']} · {fmt_ts(d['capture_ts_ms'])} · "
                           f"{d['regions']} region(s), {d['area_frac']:.1%} of frame")
                if st.button("Details", key=f"open-{d['frame_id']}", icon=":material/zoom_in:"):
                    st.query_params["frame"] = d["frame_id"]
                    st.rerun(scope="app")


def _profiles_and_health(snap: queries.Snapshot) -> None:
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Profiles in force")
        if snap.profiles.empty:
            st.caption("No frames in this range, so no profile in use.")
        else:
            prof = snap.profiles
            if prof["calibrated_at"].isna().all():
                prof = prof.drop(columns=["calibrated_at"])
            st.dataframe(
                prof, hide_index=True, width="stretch",
                column_config={
                    "product": "Product", "version": st.column_config.NumberColumn("Version", format="v%d"),
                    "model": "Model", "threshold": st.column_config.NumberColumn("Threshold", format="%.4f"),
                    "method": "Threshold method",
                    "calibrated_at": st.column_config.DatetimeColumn("Calibrated", format="YYYY-MM-DD HH:mm"),
                    "in_use_since": st.column_config.DatetimeColumn("In use since", format="YYYY-MM-DD HH:mm"),
                    "versions_seen": st.column_config.NumberColumn("Versions", format="%d"),
                },
            )
    with right:
        st.subheader("Pipeline health")
        h = snap.health
        a, b = st.columns(2)
        a.metric("Latency p50", fmt_ms(h["stored_p50_ms"]), border=True,
                 help=f"capture → row in the database, over the last {queries.HEALTH_LAST_N} frames")
        b.metric("Latency p99", fmt_ms(h["stored_p99_ms"]), border=True,
                 help=f"capture → row in the database, over the last {queries.HEALTH_LAST_N} frames")
        c, d = st.columns(2)
        c.metric("Dead-letter, all time", f"{h['dlq_total']:,}", border=True,
                 help="frames the workers could not process (topic frames.dlq, stored by the sink)")
        d.metric("Dead-letter, last hour", f"{h['dlq_last_hour']:,}", border=True)
        st.caption(f"Worker latency (capture → result) p50 {fmt_ms(h['result_p50_ms'])}, "
                   f"p99 {fmt_ms(h['result_p99_ms'])}")
        st.caption(
            f"Workers: {', '.join(h['workers']) or '—'} · engines: {', '.join(h['engines']) or '—'} · "
            f"last frame stored {fmt_ts(h['last_stored_ts_ms'])}"
            + (f" · {h['rejected_results']} unreadable result record(s)" if h["rejected_results"] else "")
        )
        if not h["dlq_reasons"].empty:
            st.dataframe(h["dlq_reasons"], hide_index=True, width="stretch",
                         column_config={"stage": "Stage", "reason": "Reason", "n": "Count",
                                        "last_seen": st.column_config.DatetimeColumn("Last", format="HH:mm:ss")})


def render(snap: queries.Snapshot, stale_since_ms: int | None = None) -> None:
    """Lay out one snapshot (pure layout: every number comes from ``snap``)."""
    _alerts(snap)
    if stale_since_ms is not None:
        st.caption(f"Database busy — showing data read at {fmt_ts(stale_since_ms)}; retrying.")
    if snap.kpis["frames"] == 0 and not snap.options.get("product"):
        st.info("The database is ready but no frame has been inspected yet. Start cameras and workers "
                "(`linewatch demo` does it all) and this page fills in by itself.")
    elif snap.kpis["frames"] == 0:
        st.info("No frames in the selected time range and filters.")
    _kpis(snap)
    _categories(snap)
    _trend(snap)
    _breakdowns(snap)
    _gallery(snap)
    review_panel(snap.reviews)
    _profiles_and_health(snap)
    _history(snap)


def _history(snap: queries.Snapshot) -> None:
    """The audit trail as a plain table (text in the page, so it can be read and copied)."""
    st.subheader("Profile version history")
    if snap.history.empty:
        st.caption("No profile recorded yet.")
        return
    h = snap.history.copy()
    h["version"] = h["version"].map(lambda v: f"v{v}")
    h["created_at"] = pd.to_datetime(h["created_at"], utc=True).dt.strftime("%Y-%m-%d %H:%M")
    for c in ("threshold", "image_threshold"):
        h[c] = h[c].map(lambda v: "—" if pd.isna(v) else f"{v:.4f}")
    h = h.rename(columns={"product": "Product", "version": "Version", "created_at": "When (UTC)", "created_by": "Who",
                          "method": "Method", "threshold": "Pixel threshold", "image_threshold": "Image threshold",
                          "escape": "Escape rate", "false_reject": "False-reject rate", "basis": "Calibrated from"})
    st.table(h.set_index(["Product", "Version"]))


def _export(db: Path, filters: queries.Filters) -> None:
    st.download_button("Export the filtered inspections (CSV)", data=lambda: queries.inspections_csv(db, filters),
                       file_name="linewatch-inspections.csv", mime="text/csv", key="export-csv",
                       icon=":material/download:", on_click="ignore")


def _options(db: Path) -> tuple[dict[str, list[str]], str | None]:
    try:
        with store.reading(db, timeout_s=2.0) as con:
            if store.schema_version(con) == 0:
                return {}, None
            return queries.filter_options(con), None
    except (store.DatabaseMissing, store.StoreBusy):
        return {}, None
    except store.NotADatabase as exc:
        return {}, str(exc)


def main() -> None:
    st.set_page_config(page_title="linewatch — line quality", page_icon=":material/factory:", layout="wide")
    args = _args()
    settings = _settings()
    db = args.db or settings.storage.db_path
    refresh_s = args.refresh or settings.dashboard.refresh_s
    options, bad = _options(db)
    filters, span_ms = _sidebar(options, refresh_s, db)
    st.title("Line quality")
    if bad:
        st.error(f"Cannot read the database: {bad}", icon=":material/error:")
        return
    frame = st.query_params.get("frame")
    if frame:
        render_detail(db, settings, _window(filters, span_ms), frame)
        return
    _export(db, _window(filters, span_ms))

    @st.fragment(run_every=refresh_s)
    def live() -> None:
        try:
            snap = queries.load_snapshot(db, _window(filters, span_ms), timeout_s=5.0)
        except store.DatabaseMissing:
            st.warning(f"No linewatch database at `{db}` yet. Start the sink (`linewatch sink`) or the whole "
                       "line (`linewatch demo`); this page checks again every few seconds.", icon=":material/database:")
            return
        except store.NotADatabase as exc:
            st.error(f"Cannot read the database: {exc}", icon=":material/error:")
            return
        except store.StoreBusy:
            prev = st.session_state.get("last_snapshot")
            if prev is None:
                st.info("The database is busy; retrying…")
                return
            render(prev, stale_since_ms=prev.read_ts_ms)
            return
        st.session_state["last_snapshot"] = snap
        if snap.options != options:  # a new product/camera/line appeared: rebuild the filters
            st.rerun(scope="app")
        render(snap)

    live()


main()
