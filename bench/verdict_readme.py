"""Rebuild the verdict's report from its cells, draw one figure per language, and write the
README's answer between its markers.

    python bench/verdict_readme.py [--out bench/results/verdict]

The figures are the Paper page's (``plots.verdict_curve_figure``), rendered to PNG by
headless Chromium (Debian's ``chromium``); without it the README links the report only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mlprune import plots, verdict
from mlprune.storage import atomic_write_text
from mlprune.verdict_report import build_report, readme_section, write_report

ROOT = Path(__file__).resolve().parents[1]


def render_png(fig, path: Path, width: int = 760, height: int = 420) -> bool:
    """The figure as a PNG through headless Chromium; False where Chromium is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "fig.html"
        fig.update_layout(width=width, height=height)
        page.write_text(fig.to_html(include_plotlyjs=True, full_html=True,
                                    config={"displayModeBar": False}), encoding="utf-8")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--window-size={width},{height}",
                        "--virtual-time-budget=4000", f"--screenshot={path}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    return path.is_file()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(verdict.default_out()))
    args = ap.parse_args()
    report = build_report(args.out, verdict.FULL)
    write_report(report, args.out)
    figures = []
    for lang, block in report["curves"].items():
        if not any(block["methods"].values()):
            continue
        png = ROOT / "assets" / f"verdict_{lang}.png"
        fig = plots.verdict_curve_figure(block, lang, report.get("dequantized_from"))
        if render_png(fig, png):
            figures.append(f"assets/{png.name}")
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    section = readme_section(report, figures)
    text = re.sub(r"(<!-- verdict:start -->\n).*?(<!-- verdict:end -->)",
                  lambda m: m.group(1) + section + m.group(2), text, flags=re.S)
    atomic_write_text(readme, text)  # a README is never left half-written
    print(section)


if __name__ == "__main__":
    main()
