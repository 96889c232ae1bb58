"""Write a figure as self-contained HTML (plotly.js inlined: works offline) and as PNG (kaleido)."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def save_figure(fig, stem: str | Path, png: bool = True, width: int = 1100, height: int = 520,
                html: bool = True) -> list[Path]:
    """Save `fig` as STEM.html (and STEM.png); returns the paths written. `html=False` writes the PNG
    alone (each HTML file carries plotly.js, about 5 MB).

    PNG export needs kaleido and a Chromium on the machine; without them only the HTML is written and
    the reason is logged.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if html:
        fig.write_html(stem.with_suffix(".html"), include_plotlyjs=True, full_html=True)
        written.append(stem.with_suffix(".html"))
    if png:
        try:
            fig.write_image(stem.with_suffix(".png"), width=width, height=height, scale=1)
            written.append(stem.with_suffix(".png"))
        except Exception as e:  # kaleido raises several types when no browser is found
            log.warning("PNG export skipped for %s: %s", stem, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return written
