"""The HTML report of a fitted :class:`~kwneuro_sk.LabelsMasker` (``generate_report()``).

What a person checks before trusting region signals: the atlas drawn over the mean of the first
image given to ``fit`` (nilearn's plotting), every region's name, label value and size, and the
regions that are lost: removed by ``mask_img`` at fit (not output columns) or absent once the
atlas is resampled to an image grid seen in ``transform`` (NaN columns for those images). The
page is a :class:`nilearn.reporting.HTMLReport` (``save_as_html``, ``open_in_browser``, shown
inline in a notebook), with the figure embedded as PNG data so the file opens offline.
"""

from __future__ import annotations

import base64
import html
import io
import string
import warnings

import numpy as np
import pandas as pd
from nilearn.reporting import HTMLReport

_PAGE = string.Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; }
tr.lost td { background: #fde8e8; }
.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
img { max-width: 100%; }
</style></head>
<body>$body</body></html>
"""
)


class MaskerReport(HTMLReport):
    """nilearn's :class:`~nilearn.reporting.HTMLReport`, saved as the page itself.

    nilearn's ``save_as_html`` writes the page inside a fixed 800 x 800 pixel frame; this one
    writes the standalone page (the figure and the full region table readable at any size).
    """

    def save_as_html(self, file_name) -> None:
        """Write the report as a self-contained HTML page (UTF-8)."""
        with open(file_name, "w", encoding="utf-8") as f:
            f.write(self.get_standalone())


def masker_report(
    *, title, regions, labels_img, mask_img, background, cmap, summary, params, notes
) -> HTMLReport:
    """Build the HTML report of a fitted LabelsMasker (see ``LabelsMasker.generate_report``).

    Parameters
    ----------
    title : str
        Page and heading title.
    regions : pandas.DataFrame
        One row per region, with a ``status`` column ("kept" or why it is lost).
    labels_img, mask_img : nibabel images (mask_img may be None)
        The fitted atlas and mask.
    background : image or None
        The image whose mean over time is drawn behind the atlas.
    cmap : str or colormap
        Colormap of the background.
    summary, params : dict
        Shown as two-column tables.
    notes : list of str
        Warnings shown at the top.

    Returns
    -------
    report : MaskerReport
    """
    notes = list(notes)
    lost = regions["status"] != "kept"
    figure = _figure_html(labels_img, mask_img, background, cmap, notes)
    if lost.any():
        notes.append(
            f"{int(lost.sum())} region(s) are lost: see the rows marked in the table "
            "(removed by mask_img at fit, or absent after resampling to an image grid)."
        )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Regions of the atlas (labels_img) and how each image's voxels are reduced to one "
        "value per region and volume.</p>",
        "".join(f'<p class="warning">{html.escape(note)}</p>' for note in notes),
        figure,
        "<h2>Summary</h2>",
        _html_table(pd.DataFrame({"": list(summary), "value": list(summary.values())})),
        f"<h2>Regions ({int((~lost).sum())} output columns, {int(lost.sum())} lost)</h2>",
        _html_table(regions, lost_rows=lost),
        "<h2>Parameters</h2>",
        _html_table(pd.DataFrame({"parameter": list(params), "value": list(params.values())})),
    ]
    return MaskerReport(_PAGE, "\n".join(body), head_values={"title": html.escape(title)})


def _figure_html(labels_img, mask_img, background, cmap, notes) -> str:
    """The atlas over the mean image (nilearn's plot_img + contours), as an inline PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from nilearn.image import mean_img
        from nilearn.plotting import find_xyz_cut_coords, plot_img, plot_roi
    except ImportError:
        notes.append(
            'matplotlib is not installed (pip install "kwneuro_sk[plotting]"): the report has '
            "no figure."
        )
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cut_coords = find_xyz_cut_coords(labels_img, activation_threshold=0.5)
        except ValueError:
            cut_coords = None
        if background is not None:
            mean = mean_img(background, copy_header=True)
            display = plot_img(mean, cut_coords=cut_coords, black_bg=False, cmap=cmap)
            display.add_contours(labels_img, filled=False, linewidths=1.5)
        else:
            display = plot_roi(labels_img, bg_img=None, cut_coords=cut_coords, black_bg=False)
        if mask_img is not None:
            display.add_contours(mask_img, levels=[0.5], colors="g", linewidths=1.5)
        buffer = io.BytesIO()
        display.frame_axes.figure.savefig(buffer, format="png", dpi=80, facecolor="white")
        display.close()
        plt.close("all")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = (
        "Atlas contours over the mean of the first image given to fit"
        if background is not None
        else "Atlas regions"
    )
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{caption}"
        f"{'; mask_img contours in green' if mask_img is not None else ''}."
        "</figcaption></figure>"
    )


def _html_table(frame, lost_rows=None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for i, values in enumerate(frame.itertuples(index=False)):
        cls = ' class="lost"' if lost_rows is not None and bool(lost_rows.iloc[i]) else ""
        cells = "".join(f"<td>{html.escape(_cell(v))}</td>" for v in values)
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)
