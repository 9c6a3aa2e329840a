"""A report's text: numbers formatted once, and each section rendered into Markdown and into
self-contained HTML from the same data."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path


def pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def count(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless ``n`` is 1: "1 run", "3 runs"."""
    return f"{n} {noun}{'s' * (n != 1)}"


def interval(ci: tuple[float, float]) -> str:
    return "-" if not all(map(math.isfinite, ci)) else f"[{pct(ci[0])}, {pct(ci[1])}]"


def signed_interval(ci: tuple[float, float]) -> str:
    if not all(map(math.isfinite, ci)):
        return "-"
    return f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


@dataclass
class Section:
    """One piece of a report: a heading, a paragraph, a table or a figure."""

    kind: str  # "h1" | "h2" | "h3" | "text" | "table" | "figure" | "code"
    text: str = ""  # heading, paragraph (Markdown emphasis ** allowed), caption or code
    header: list[str] | None = None
    rows: list[list[str]] | None = None
    path: Path | None = None  # a figure's PNG


def to_markdown(sections: list[Section], base: Path) -> str:
    """The report as Markdown; figures are linked relative to ``base``."""
    out = []
    for s in sections:
        if s.kind in ("h1", "h2", "h3"):
            out += ["#" * int(s.kind[1]) + " " + s.text, ""]
        elif s.kind == "text":
            out += [s.text, ""]
        elif s.kind == "table":
            out += ["| " + " | ".join(s.header) + " |", "|" + "---|" * len(s.header)]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                    for row in s.rows]
            out += [""] + ([s.text, ""] if s.text else [])
        elif s.kind == "figure":
            link = s.path.relative_to(base).as_posix()
            out += [f"![{s.text}]({link})", "", f"*{s.text}*", ""]
        elif s.kind == "code":
            out += ["```toml", s.text.strip(), "```", ""]
    return "\n".join(out)


def to_html(sections: list[Section], title: str) -> str:
    """The report as one HTML page with its figures inlined (no other file needed)."""
    body = []
    for s in sections:
        text = html.escape(s.text.replace("**", ""))
        if s.kind in ("h1", "h2", "h3"):
            body.append(f"<{s.kind}>{text}</{s.kind}>")
        elif s.kind == "text":
            body.append(f"<p>{text}</p>")
        elif s.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) +
                           "</tr>" for row in s.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            if s.text:
                body.append(f"<p class='note'>{text}</p>")
        elif s.kind == "figure":
            data = base64.b64encode(s.path.read_bytes()).decode()
            body.append(f"<figure><img alt='{text}' src='data:image/png;base64,{data}'>"
                        f"<figcaption>{text}</figcaption></figure>")
        elif s.kind == "code":
            body.append(f"<pre>{html.escape(s.text)}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
             "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;"
             "font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}"
             ".note{font-size:13px;color:#555}pre{background:#f6f6f6;padding:1em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
