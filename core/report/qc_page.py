"""The QC page, ``qc.html``: one self-contained HTML file a neuroradiologist can act on in a
minute.

From the top: the study's identifiers, every QC warning (prominent, or a plain "no warnings"),
the cord's summary and the slice to look at first (the most compressed); a sagittal b0 through
the cord centre with a mark at each axial slice; cord area, FA and MD along the cord (inline
SVG); the region table (FA, MD, AD, RD mean and SD, voxels, volume and confidence); then every
axial slice, superior first, as zoomed crops of the cord (each voxel at least 8 px): the b0
with the region outlines on a second, transparent layer that ``o`` switches off, FA and MD.

Images are ``data:`` PNGs drawn at the voxel grid and enlarged by the browser without
smoothing (``image-rendering: pixelated``), so the file stays small; only the outline layer is
drawn enlarged, so outlines are one pixel thin. Display is radiological (patient's left on the
viewer's right, anterior up), as in ``qc.png``.

The page obeys :mod:`core.report.page_policy`: its only script and style sheet are
``qc_page.js`` and ``qc_page.css``, inlined byte for byte; no inline ``style`` or ``on...``
attribute, no external request. Keys: ``j``/``k`` or the arrows move between slices, ``o``
toggles the outlines, ``w`` jumps to the most compressed slice.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from core.labels import REGIONS
from core.report import page_policy
from core.report.qc import _crop_box, _display, _lut, _outlines, viridis

if TYPE_CHECKING:
    from core.report.write import Analysis

VOXEL_PX = 8
"""Displayed width of one in-plane voxel in the slice crops (px); rows keep the aspect ratio."""
MARGIN_MM = 3.5
"""Crop margin around the cord, mm: enough to see the CSF ring, small enough for two slices
side by side on a 1400 px wide window."""
MD_RANGE = (0.0, 2.0e-3)
"""MD colour window, mm^2/s: cord tissue 0.6-1.0e-3 in the middle, CSF (~3e-3) saturated."""
SAGITTAL_PX_PER_MM = 6.0
"""Scale of the sagittal overview, px per mm."""


def write_qc_page(analysis: Analysis, report: dict[str, Any], out_path: Path) -> None:
    """Write the QC page of ``analysis`` to ``out_path`` (UTF-8 HTML, about 100-300 kB).

    Parameters
    ----------
    analysis : the analysis on the canonical RAS+ grid (b0, labels, FA, MD: (X, Y, Z), axial
        slices along Z; ``canonical.zooms`` voxel size in mm).
    report : the report dict; ``regions``, ``cord``, ``slices``, ``most_compressed_slice``,
        ``qc``, ``input``, ``model``, ``software`` and ``refinement`` are read;
        ``timings_s`` and ``dicom_outputs`` are not needed.
    out_path : where to write ``qc.html``.
    """
    zooms = tuple(float(z) for z in analysis.canonical.zooms[:3])
    body = "".join([
        _header(report),
        _warnings(report),
        _summary(report),
        '<div class="overview">',
        _sagittal(analysis.b0, analysis.segmentation.labels, zooms, report.get("most_compressed_slice")),
        _plots(report),
        _region_table(report),
        "</div>",
        _slices(analysis, zooms, report),
    ])
    out_path.write_text(_document(_title(report), body), encoding="utf-8")


def _document(title: str, body: str) -> str:
    """The whole page: CSP meta, the policy's style sheet and script, ``body``."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_attribute(page_policy.meta_policy())}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{page_policy.style()}</style></head>"
        f'<body tabindex="-1">{body}<script>{page_policy.script()}</script></body></html>\n'
    )


def _attribute(text: str) -> str:
    """``text`` escaped for a double-quoted attribute (single quotes kept, as CSP reads best)."""
    return escape(text, quote=False).replace('"', "&quot;")


# ---------------------------------------------------------------------------------------------
# Text sections


def _num(value: float | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    """``value * scale`` formatted, or an en dash when there is no value."""
    return "\u2013" if value is None else format(value * scale, fmt)


def _title(report: dict[str, Any]) -> str:
    inp = report.get("input", {})
    name = inp.get("series_description") or next((f["name"] for f in inp.get("files", [])), "study")
    return f"scsnet QC \u2013 {name}"


def _header(report: dict[str, Any]) -> str:
    """Title, the review marker, identifiers of the input, model and software."""
    inp, model = report.get("input", {}), report.get("model", {})
    ids = [
        ("Accession", inp.get("accession_number")), ("Study UID", inp.get("study_instance_uid")),
        ("Series UID", inp.get("series_instance_uid")), ("Series", inp.get("series_description")),
        ("Manufacturer", inp.get("manufacturer")), ("Format", inp.get("format")),
        ("Files", f"{len(inp.get('files', []))} (SHA-256 in report.json)"),
        ("Voxel size", " x ".join(_num(v, ".2f") for v in inp.get("voxel_size_mm", [])) + " mm"),
        ("Model", (f"{model.get('name', '?')} {model.get('version', '?')} (sha256 {str(model.get('sha256', ''))[:12]}, "
                   f"{model.get('provider', '?')})")),
        ("Software", ", ".join(f"{k} {v}" for k, v in report.get("software", {}).items())),
        ("Created", report.get("created")),
    ]
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v)) if v else chr(0x2013)}</dd>" for k, v in ids)
    return (
        f'<header><h1>{escape(_title(report))}</h1>{page_policy.REVIEW_MARKER}'
        '<p class="keys">Keys: <kbd>j</kbd>/<kbd>k</kbd> or arrows: next/previous slice, '
        '<kbd>o</kbd>: outlines on/off, <kbd>w</kbd>: most compressed slice. '
        '<button type="button" id="toggle-outlines">Outlines on/off (o)</button> '
        '<button type="button" id="go-worst">Most compressed slice (w)</button> '
        '<span id="status" aria-live="polite"></span></p>'
        f'<dl class="ids">{rows}</dl></header>'
    )


def _warnings(report: dict[str, Any]) -> str:
    """Every QC warning, prominent; a plain line when there is none."""
    warnings = report.get("qc", {}).get("warnings", [])
    if not warnings:
        return '<section id="warnings" class="warnings none"><h2>QC warnings: none</h2></section>'
    items = "".join(f"<li>{escape(w)}</li>" for w in warnings)
    return f'<section id="warnings" class="warnings"><h2>QC warnings ({len(warnings)})</h2><ul>{items}</ul></section>'


def _summary(report: dict[str, Any]) -> str:
    """Whole-cord values, the most compressed slice, slices without cord, the refinement."""
    cord, qc, ref = report.get("cord", {}), report.get("qc", {}), report.get("refinement", {})
    areas = [s["cord_area_mm2"] for s in report.get("slices", []) if s.get("cord_area_mm2")]
    worst = report.get("most_compressed_slice")
    missing = qc.get("slices_without_cord", [])
    parts = [
        f"Cord FA <b>{_num(cord.get('fa', {}).get('mean'))}</b>",
        f"MD <b>{_num(cord.get('md', {}).get('mean'), '.3f', 1e3)}</b> x10<sup>-3</sup> mm<sup>2</sup>/s",
        f"{cord.get('voxels', 0)} voxels, {_num(cord.get('volume_mm3'), '.0f')} mm<sup>3</sup>",
        f"area {min(areas):.1f}\u2013{max(areas):.1f} mm<sup>2</sup>" if areas else "no cord found",
        f'most compressed: <a class="worst-link" href="#slice-{worst}">slice {worst}</a>' if worst is not None else "",
        f"b0 SNR {_num(qc.get('b0_snr'), '.1f')}",
        f"slices without cord: {escape(', '.join(map(str, missing)))}" if missing else "cord on every slice",
        f"refinement: {'on' if ref.get('applied') else 'off'}, {ref.get('voxels_removed', 0)} outline voxels trimmed"
        + (f", first pass kept on slice(s) {escape(', '.join(map(str, kept)))}" if (kept := ref.get("first_pass_slices")) else ""),
    ]
    return '<p class="summary">' + " \u00b7 ".join(p for p in parts if p) + "</p>"


def _swatch(colour: Sequence[int]) -> str:
    """A small square of ``colour`` (an SVG presentation attribute, allowed by the policy)."""
    hexa = "#{:02x}{:02x}{:02x}".format(*colour)
    return f'<svg class="swatch" width="12" height="12" aria-hidden="true"><rect width="12" height="12" fill="{hexa}"/></svg>'


def _region_row(name: str, m: dict[str, Any], swatch: str, cls: str = "") -> str:
    """One table row: voxels, volume, FA, MD, AD, RD mean and SD, and the confidence."""
    cells = [f'<th scope="row">{swatch}{escape(name)}</th>', f"<td>{m.get('voxels', 0)}</td>",
             f"<td>{_num(m.get('volume_mm3'), '.0f')}</td>"]
    for key, scale in (("fa", 1.0), ("md", 1e3), ("ad", 1e3), ("rd", 1e3)):
        s = m.get(key, {})
        cells.append(f"<td>{_num(s.get('mean'), '.3f', scale)}</td><td class=\"sd\">{_num(s.get('sd'), '.3f', scale)}</td>")
    cells.append(f"<td>{_num(m.get('confidence'), '.2f')}</td>")
    return f'<tr class="{cls}">' + "".join(cells) + "</tr>"


def _region_table(report: dict[str, Any]) -> str:
    """The regions and the whole cord: FA (1), MD/AD/RD (x10^-3 mm^2/s) mean and SD."""
    colours = {r.code: r.colour for r in REGIONS}
    rows = [_region_row(f"{r['code']} {r['name']}", r, _swatch(colours.get(r["code"], (0, 0, 0))))
            for r in report.get("regions", [])]
    rows.append(_region_row("whole cord", report.get("cord", {}), "", "cord"))
    head = ('<tr><th rowspan="2">region</th><th rowspan="2">voxels</th><th rowspan="2">volume mm<sup>3</sup></th>'
            '<th colspan="2">FA</th><th colspan="2">MD</th><th colspan="2">AD</th><th colspan="2">RD</th>'
            '<th rowspan="2">confidence</th></tr>'
            "<tr>" + "<th>mean</th><th>SD</th>" * 4 + "</tr>")
    return (
        '<section class="regions"><h2>Regions</h2><table id="region-table"><caption>FA dimensionless; MD, AD, RD '
        f"in x10<sup>-3</sup> mm<sup>2</sup>/s</caption><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


# ---------------------------------------------------------------------------------------------
# Images


def _png_uri(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grey(values: NDArray[np.floating], lo: float, hi: float) -> Image.Image:
    """A 2D array windowed to [lo, hi] as an 8-bit grey image."""
    scaled = np.clip((np.nan_to_num(values) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8))


def _outline_layer(labels: NDArray[np.integer], rows: int, cols: int) -> Image.Image:
    """Region borders of a 2D display-oriented label image enlarged ``rows`` x ``cols``, each in
    its region's colour on transparent (palette PNG: index 0 transparent, index = label code)."""
    big = np.repeat(np.repeat(labels.astype(np.uint8), rows, axis=0), cols, axis=1)
    edges = np.ascontiguousarray(np.where(_outlines(big), big, 0).astype(np.uint8))
    image = Image.frombytes("P", (edges.shape[1], edges.shape[0]), edges.tobytes())
    image.putpalette(_lut()[:16].ravel().tolist())
    image.info["transparency"] = 0
    return image


def _img(uri: str, width: int, height: int, cls: str, alt: str) -> str:
    return f'<img class="{cls}" src="{uri}" width="{width}" height="{height}" alt="{escape(alt)}">'


# ---------------------------------------------------------------------------------------------
# Overview and plots


def _sagittal(b0: NDArray[np.floating], labels: NDArray[np.integer], zooms: tuple[float, ...], worst: int | None) -> str:
    """The b0 through the cord centre (sagittal: superior up, anterior left), a line per slice.

    b0, labels : (X, Y, Z). The plane is the median x of the cord's voxels.
    """
    nx, ny, nz = labels.shape
    ii, jj, _ = np.nonzero(labels)
    x = int(np.median(ii)) if ii.size else nx // 2
    margin = int(np.ceil(3 * MARGIN_MM / zooms[1]))
    j0, j1 = (max(int(jj.min()) - margin, 0), min(int(jj.max()) + margin + 1, ny)) if jj.size else (0, ny)
    plane = np.flipud(b0[x, j0:j1, :].T)[:, ::-1]  # rows: superior first; columns: anterior first
    lo, hi = np.percentile(plane, [1, 99.5]) if plane.size else (0.0, 1.0)
    cols = max(1, round(SAGITTAL_PX_PER_MM * zooms[1]))
    rows = max(1, round(cols * zooms[2] / zooms[1]))
    w, h, label_w = plane.shape[1] * cols, nz * rows, 34
    marks = []
    for z in range(nz):
        y = (nz - 1 - z) * rows + rows / 2
        cls = "mark worst" if z == worst else "mark"
        marks.append(f'<a href="#slice-{z}"><g class="{cls}" data-slice="{z}"><line x1="0" x2="{w + 4}" y1="{y:.1f}" '
                     f'y2="{y:.1f}" stroke-width="1"/><text x="{w + 6}" y="{y + 4:.1f}">{z}</text></g></a>')
    image = f'<image href="{_png_uri(_grey(plane, lo, hi))}" width="{w}" height="{h}" preserveAspectRatio="none"/>'
    return (
        f'<figure class="sagittal"><svg width="{w + label_w}" height="{h}" viewBox="0 0 {w + label_w} {h}" role="img" '
        f'aria-label="sagittal b0 with slice positions">{image}{"".join(marks)}</svg>'
        f"<figcaption>sagittal b0 (x={x}), A left</figcaption></figure>"
    )


def _plot(values: Sequence[float | None], *, title: str, fmt: str, worst: int | None) -> str:
    """A line plot of one value per slice, superior slice on the left; ``worst`` marked.

    values : one per slice, index = slice (0 = most inferior); None where there is no cord.
    """
    w, h, pad_l, pad_r, pad_y = 330, 110, 46, 8, 14
    n = len(values)
    known = [v for v in values if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo))

    def xy(z: int, v: float) -> tuple[float, float]:
        x = pad_l + (n - 1 - z) * (w - pad_l - pad_r) / max(n - 1, 1)
        return x, pad_y + (hi - v) * (h - 2 * pad_y) / (hi - lo)

    pts = [(z, *xy(z, v), v) for z, v in enumerate(values) if v is not None]
    path = " ".join(f"{x:.1f},{y:.1f}" for _, x, y, _ in sorted(pts, key=lambda p: p[1]))
    parts = [f'<text class="axis" x="2" y="{pad_y}">{format(hi, fmt)}</text>',
             f'<text class="axis" x="2" y="{h - pad_y + 8}">{format(lo, fmt)}</text>',
             f'<text class="ptitle" x="{pad_l}" y="10">{title}</text>',
             f'<polyline points="{path}" fill="none" stroke="#9ecae1" stroke-width="1.5"/>']
    if worst is not None and 0 <= worst < n:
        x, _ = xy(worst, lo)
        parts.append(f'<line class="worst-line" x1="{x:.1f}" x2="{x:.1f}" y1="{pad_y - 4}" y2="{h - pad_y + 4}" '
                     'stroke="#ff5a4e" stroke-dasharray="3 2"/>')
    for z, x, y, v in pts:
        cls = "pt worst" if z == worst else "pt"
        parts.append(f'<a href="#slice-{z}"><circle class="{cls}" data-slice="{z}" cx="{x:.1f}" cy="{y:.1f}" r="3.5">'
                     f"<title>slice {z}: {format(v, fmt)}</title></circle></a>")
    parts.append(f'<text class="axis" x="{pad_l}" y="{h - 1}">superior</text>'
                 f'<text class="axis" x="{w - pad_r}" y="{h - 1}" text-anchor="end">inferior</text>')
    return f'<svg class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">{"".join(parts)}</svg>'


def _plots(report: dict[str, Any]) -> str:
    """Cord area, FA and MD along the cord, the most compressed slice marked."""
    slices = sorted(report.get("slices", []), key=lambda s: s["index"])
    n = max((s["index"] for s in slices), default=-1) + 1
    by_index = {s["index"]: s for s in slices}

    def series(key: str, scale: float = 1.0, zero_is_none: bool = False) -> list[float | None]:
        out: list[float | None] = []
        for z in range(n):
            v = by_index.get(z, {}).get(key)
            out.append(None if v is None or (zero_is_none and not v) else float(v) * scale)
        return out

    worst = report.get("most_compressed_slice")
    return (
        '<div class="plots">'
        + _plot(series("cord_area_mm2", zero_is_none=True), title="cord area (mm\u00b2)", fmt=".0f", worst=worst)
        + _plot(series("cord_fa_mean"), title="cord FA", fmt=".2f", worst=worst)
        + _plot(series("cord_md_mean", 1e3), title="cord MD (x10\u207b\u00b3 mm\u00b2/s)", fmt=".2f", worst=worst)
        + '<p class="legend"><span class="worst-key">red</span>: most compressed slice</p></div>'
    )


# ---------------------------------------------------------------------------------------------
# Slices


def _slice_values(s: dict[str, Any] | None) -> str:
    """Cord area, FA and MD of one slice, and its regions' FA and MD in a collapsed table."""
    if not s:
        return '<p class="vals">not measured</p>'
    head = (f'<p class="vals">area <b>{_num(s.get("cord_area_mm2"), ".1f")}</b> mm<sup>2</sup> \u00b7 '
            f'FA <b>{_num(s.get("cord_fa_mean"))}</b> \u00b7 MD <b>{_num(s.get("cord_md_mean"), ".3f", 1e3)}</b></p>')
    names = {r.key: (r.code, r.name) for r in REGIONS}
    rows = "".join(
        f"<tr><td>{names.get(k, (0, k))[0]} {escape(names.get(k, (0, k))[1])}</td><td>{v.get('voxels', 0)}</td>"
        f"<td>{_num(v.get('fa_mean'))}</td><td>{_num(v.get('md_mean'), '.3f', 1e3)}</td>"
        f"<td>{_num(v.get('confidence'), '.2f')}</td></tr>"
        for k, v in s.get("regions", {}).items()
    )
    return head + (f"<details><summary>regions</summary><table><tr><th>region</th><th>vox</th><th>FA</th>"
                   f"<th>MD</th><th>conf.</th></tr>{rows}</table></details>" if rows else "")


def _slice_boxes(labels: NDArray[np.integer], margin: int) -> list[tuple[slice, slice]]:
    """One crop per axial slice, all the same size (the largest cord plus ``margin`` voxels on
    each side), centred on that slice's cord (on all slices' cord where it has none).

    labels : (X, Y, Z). Returns (x-slice, y-slice) per z, inside the image.
    """
    union = _crop_box(labels, margin)
    boxes = [_crop_box(labels[:, :, z : z + 1], margin) if labels[:, :, z].any() else union
             for z in range(labels.shape[2])]
    size = [max(b[axis].stop - b[axis].start for b in boxes) for axis in (0, 1)]
    out = []
    for box in boxes:
        fitted = []
        for axis, part in enumerate(box):
            start = (part.start + part.stop - size[axis]) // 2
            start = min(max(start, 0), max(labels.shape[axis] - size[axis], 0))
            fitted.append(slice(start, start + size[axis]))
        out.append((fitted[0], fitted[1]))
    return out


def _crops(analysis: Analysis, box: tuple[slice, slice], z: int, rows: int, cols: int,
           window: tuple[float, float]) -> str:
    """The b0 (with its outline layer), FA and MD crops of slice ``z``, displayed enlarged."""
    si, sj = box
    lab = _display(analysis.segmentation.labels[si, sj, z])
    h, w = lab.shape[0] * rows, lab.shape[1] * cols
    fa = viridis(_display(analysis.maps.fa[si, sj, z]))
    md = viridis(_display(analysis.maps.md[si, sj, z]) / MD_RANGE[1])
    return (
        '<figure class="stack"><div class="layers">'
        + _img(_png_uri(_grey(_display(analysis.b0[si, sj, z]), *window)), w, h, "base", f"b0 slice {z}")
        + _img(_png_uri(_outline_layer(lab, rows, cols)), w, h, "outline", "region outlines")
        + '<span class="ori r">R</span><span class="ori l">L</span></div><figcaption>b0</figcaption></figure>'
        + f'<figure>{_img(_png_uri(Image.fromarray(fa)), w, h, "base", "FA")}<figcaption>FA 0\u20131</figcaption></figure>'
        + f'<figure>{_img(_png_uri(Image.fromarray(md)), w, h, "base", "MD")}'
        "<figcaption>MD 0\u20132 x10<sup>-3</sup> mm<sup>2</sup>/s</figcaption></figure>"
    )


def _slices(analysis: Analysis, zooms: tuple[float, ...], report: dict[str, Any]) -> str:
    """Every axial slice, superior first: b0 with outlines, FA and MD crops, and its values."""
    labels, b0 = analysis.segmentation.labels, analysis.b0
    cols = VOXEL_PX
    rows = max(1, round(cols * zooms[1] / zooms[0]))
    margin = int(np.ceil(MARGIN_MM / min(zooms[0], zooms[1])))
    boxes = _slice_boxes(labels, margin)
    si, sj = _crop_box(labels, margin)
    lo, hi = np.percentile(b0[si, sj], [1, 99.5]) if b0.size else (0.0, 1.0)
    by_index = {s["index"]: s for s in report.get("slices", [])}
    worst = report.get("most_compressed_slice")
    cards = []
    for z in reversed(range(labels.shape[2])):
        is_worst = z == worst
        badge = '<span class="badge">most compressed</span>' if is_worst else ""
        cards.append(
            f'<section class="slice{" worst" if is_worst else ""}" id="slice-{z}" data-slice="{z}" tabindex="-1">'
            f"<h3>slice {z} {badge}</h3>{_slice_values(by_index.get(z))}"
            f'<div class="crops">{_crops(analysis, boxes[z], z, rows, cols, (float(lo), float(hi)))}</div></section>'
        )
    return (f'<section class="slices"><h2>Axial slices (superior first; radiological: patient\'s left on the right)</h2>'
            f'{_legend()}<div class="grid">{"".join(cards)}</div></section>')


def _legend() -> str:
    """The region colours of the outlines."""
    items = "".join(f"<li>{_swatch(r.colour)}{r.code} {escape(r.name)}</li>" for r in REGIONS)
    return f'<ul class="region-legend">{items}</ul>'
