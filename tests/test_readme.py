"""The README's findings are the committed reports' numbers: every cell of its findings tables
is read back from the report it links, so a remade report and a stale README cannot both land."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT_LINK = re.compile(r"\(reports/([\w.-]+)/README\.md\)")


def row_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def md_tables(text: str) -> list[tuple[str | None, list[str], list[list[str]]]]:
    """Each Markdown table in ``text``: the report linked last before it, its header, its rows."""
    tables, link, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        if m := REPORT_LINK.search(lines[i]):
            link = m.group(1)
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header, rows, i = row_cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(row_cells(lines[i]))
                i += 1
            tables.append((link, header, rows))
            continue
        i += 1
    return tables


def report_comparisons(name: str) -> dict[str, dict[str, dict[str, str]]]:
    """A committed report's comparisons: title -> scheme -> its cells of the per-scheme table
    and of the table against the baseline (the baseline has only the first)."""
    found: dict[str, dict[str, dict[str, str]]] = {}
    text = (ROOT / "reports" / name / "README.md").read_text()
    for section in re.split(r"^## Comparison \d+: ", text, flags=re.M)[1:]:
        title, schemes = section.splitlines()[0], {}
        for _, header, rows in md_tables(section):
            if "test 95% CI" in header or "Welch 95% CI" in header:
                for row in rows:
                    schemes.setdefault(row[0], {}).update(zip(header, row))
        found[title] = schemes
    return found


def same_verdict(readme: str, report: str) -> bool:
    """The README abbreviates verdicts: 'inc.' for inconclusive, 'equiv.' for equivalent..."""
    return report.startswith(readme.rstrip("."))


def check_scheme_table(header, rows, comparison) -> int:
    """A table of one comparison, a row per scheme; returns the number of cells checked."""
    checked = 0
    for row in rows:
        scheme = row[0].split()[0]
        cells = comparison[scheme]
        for column, cell in zip(header[1:], row[1:]):
            if not cell:
                continue
            if column.startswith("lr"):
                # a confirmation's report says "set by its tuning study" where a tuning study's
                # says "chosen on validation"
                chosen = cells.get("chosen on validation") or cells["set by its tuning study"]
                chosen = chosen.removeprefix("lr=")
                assert float(chosen) == float(cell), (scheme, column)  # 1e-08 is written 1e-8
            elif column.startswith("test acc"):
                assert cell == f"{cells['test acc (%)']} {cells['test 95% CI']}", (scheme, column)
                if n := re.search(r"n = (\d+)", column):
                    assert cells["runs"] == n.group(1), (scheme, column)
            elif column.startswith("Δ"):
                diff = next(v for k, v in cells.items() if k.startswith("Δ"))
                assert cell == f"{diff} {cells['Welch 95% CI']}", (scheme, column)
            elif column == "verdict":
                assert same_verdict(cell, cells["verdict"]), (scheme, cell, cells["verdict"])
            elif column.startswith("n for"):
                assert cell == cells[column], (scheme, column)
            else:
                pytest.fail(f"README column {column!r} has no rule here to read it from the report")
            checked += 1
    return checked


def check_axis_table(header, rows, comparisons) -> int:
    """A table along depth ('ReLU 2 | 5 | ... | tanh 5 | ...'): each cell is one comparison's
    test accuracy for the row's scheme, with its verdict after it."""
    columns, act = [], None
    for column in header[1:]:
        *word, depth = column.split()
        act = word[0].lower() if word else act
        columns.append(f"depth={depth},width=256,act={act},")
    checked = 0
    for row in rows:
        for key, cell in zip(columns, row[1:]):
            (title,) = [t for t in comparisons if key in t]
            cells = comparisons[title][row[0]]
            acc, *verdict = cell.split()
            assert acc == cells["test acc (%)"], (row[0], title)
            if verdict:
                assert same_verdict(verdict[0], cells["verdict"]), (row[0], title, cell)
            checked += 1
    return checked


def test_every_findings_table_cell_is_its_reports_number():
    tables = [t for t in md_tables((ROOT / "README.md").read_text()) if t[1][0] == "scheme"]
    assert tables, "the README has no findings tables"
    for report, header, rows in tables:
        assert report, f"a findings table with no report linked before it: {header}"
        comparisons = report_comparisons(report)
        if header[1].split()[0] in ("ReLU", "tanh"):
            checked = check_axis_table(header, rows, comparisons)
        else:
            (comparison,) = comparisons.values()
            checked = check_scheme_table(header, rows, comparison)
        assert checked >= len(rows), (report, checked)


def test_the_readme_stays_a_front_door():
    """At most 9,000 characters: what the tool is, the two commands, the findings as tables,
    the reference links; the long paragraphs live in the reports and docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 9000, f"README.md is {len(text):,} characters; move prose to docs/"
    for command in ("initstudy run --scheme kaiming", "python -m pytest -q"):
        assert command in text
