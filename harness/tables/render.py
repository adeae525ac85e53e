"""Tables rendered as Markdown and as LaTeX (booktabs)."""

from __future__ import annotations

import re

from harness.tables.format import MISSING, Cell, Table


def to_markdown(table: Table, title: str = "") -> str:
    """A GitHub Markdown table (numbers right-aligned, bold as ``**...**``) under ``title``."""
    head = f"{title}\n\n" if title else ""
    if not table.rows:
        return f"{head}(no runs)\n"

    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|")
        return f"**{text}**" if c.bold and text else text

    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |"]
    lines.append("|" + "|".join("---:" if num else "---" for num in table.numeric) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in [*table.rows, *table.below]]
    return head + "\n".join(lines) + "\n"


def to_latex(table: Table, caption: str = "") -> str:
    r"""A booktabs ``table`` environment (needs ``\usepackage{booktabs,graphicx}``): a header's unit on a second
    line, the baselines below a rule, shrunk to the line width only when wider; ``caption`` is LaTeX already."""
    if not table.rows:
        return "% no runs\n"

    def cell(c: Cell) -> str:
        text = tex_escape(c.text).replace("±", "$\\pm$").replace(MISSING, "--")
        text = re.sub(r"(^|(?<= ))-(?=\d)", "$-$", text)  # a minus sign, not a hyphen
        return f"\\textbf{{{text}}}" if c.bold and text else text

    def head(h: str) -> str:
        label, _, unit = h.partition(" (")
        if not unit.endswith(")"):
            return tex_escape(h)
        return f"\\begin{{tabular}}[b]{{@{{}}c@{{}}}}{tex_escape(label)}\\\\({tex_escape(unit)}\\end{{tabular}}"

    spec = "".join("r" if num else "l" for num in table.numeric)
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        "\\setlength{\\tabcolsep}{4pt}",
        "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(head(h) for h in table.header) + " \\\\",
        "\\midrule",
        *(" & ".join(cell(c) for c in row) + " \\\\" for row in table.rows),
        *(["\\midrule"] if table.below else []),
        *(" & ".join(cell(c) for c in row) + " \\\\" for row in table.below),
        "\\bottomrule",
        "\\end{tabular}%",
        "}",
        *([f"\\caption{{{caption}}}"] if caption else []),
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {
    "\\": "\\textbackslash{}",
    "{": "\\{",
    "}": "\\}",
    "_": "\\_",
    "%": "\\%",
    "&": "\\&",
    "#": "\\#",
    "$": "\\$",
    "~": "\\textasciitilde{}",
    "^": "\\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return re.sub(r"[\\{}_%&#$~^]", lambda m: _TEX_SPECIAL[m.group(0)], text)
