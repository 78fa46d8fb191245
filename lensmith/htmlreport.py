"""Self-contained HTML reports (no external CSS/JS/fonts/images: they open offline and call nowhere).

Every stage report (validation, evaluation, gate, drift, export) is built with `HtmlReport`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lensmith import __version__
from lensmith.fsutil import write_text_atomic

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1d2433;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
h3{font-size:1.05rem}.meta{color:#667;font-size:.85rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}th,td{border:1px solid #d5d9e0;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f5f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#0a7a2f;font-weight:600}.fail{color:#b3261e;font-weight:600}.warn{color:#9a6700;font-weight:600}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:1rem;color:#fff;font-weight:600}
.badge.pass{background:#0a7a2f;color:#fff}.badge.fail{background:#b3261e;color:#fff}
.grid{display:flex;flex-wrap:wrap;gap:.6rem}.grid figure{margin:0;width:150px;font-size:.75rem}
.grid img{width:150px;height:150px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccd}
figure img{max-width:100%}code{background:#f3f5f9;padding:0 .2rem}
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        cls = "pass" if value else "fail"
        return f'<td class="{cls}">{"pass" if value else "FAIL"}</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if value is None:
        return "<td></td>"
    return f"<td>{html.escape(str(value))}</td>"


class HtmlReport:
    """Accumulates sections and writes one self-contained HTML file."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self._parts: list[str] = []
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self._parts.append(f"<h1>{html.escape(title)}</h1>")
        self._parts.append(f'<p class="meta">{html.escape(subtitle)} generated {stamp} by lensmith {__version__}</p>')

    def heading(self, text: str, level: int = 2) -> HtmlReport:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def paragraph(self, text: str) -> HtmlReport:
        self._parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def status(self, passed: bool, text: str) -> HtmlReport:
        cls = "pass" if passed else "fail"
        label = "PASSED" if passed else "FAILED"
        self._parts.append(f'<p><span class="badge {cls}">{label}</span> {html.escape(text)}</p>')
        return self

    def key_values(self, items: Mapping[str, Any]) -> HtmlReport:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th>{_cell(v)}</tr>" for k, v in items.items())
        self._parts.append(f"<table>{rows}</table>")
        return self

    def table(self, rows: Sequence[Mapping[str, Any]] | Any, columns: Sequence[str] | None = None) -> HtmlReport:
        """Rows as a list of dicts or a pandas DataFrame."""
        if hasattr(rows, "to_dict"):
            columns = list(columns or rows.columns)
            rows = rows.to_dict("records")
        rows = list(rows)
        if not rows:
            self._parts.append('<p class="meta">(none)</p>')
            return self
        columns = list(columns or rows[0].keys())
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
        self._parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def image(self, data: bytes, caption: str = "", mime: str = "image/png") -> HtmlReport:
        src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f'<figure><img src="{src}" alt="{html.escape(caption)}">{cap}</figure>')
        return self

    def image_grid(self, items: Iterable[tuple[bytes, str]], mime: str = "image/png") -> HtmlReport:
        figs = []
        for data, caption in items:
            src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            figs.append(f'<figure><img src="{src}" alt=""><figcaption>{html.escape(caption)}</figcaption></figure>')
        self._parts.append(f'<div class="grid">{"".join(figs)}</div>')
        return self

    def raw_html(self, fragment: str) -> HtmlReport:
        """Trusted markup produced by lensmith itself (never user input)."""
        self._parts.append(fragment)
        return self

    def render(self) -> str:
        body = "\n".join(self._parts)
        return (
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
        )

    def save(self, path: Path) -> Path:
        write_text_atomic(Path(path), self.render())
        return Path(path)


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """A matplotlib figure -> PNG bytes (closes the figure)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
