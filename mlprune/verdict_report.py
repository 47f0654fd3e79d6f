"""The verdict's report, where the command line, the Paper page and
``bench/verdict_readme.py`` have always imported it from.

It lives in :mod:`mlprune.reports.verdict` (built from the cells: comparisons, curves,
translation, claims) and :mod:`mlprune.reports.verdict_markdown` (the report as Markdown, the
README's section, the claims table); this module only re-exports their public names.
"""

from __future__ import annotations

from mlprune.reports.verdict import (
    ALPHA,
    SHARED_RULE,
    TARGET,
    Measured,
    analysis,
    analysis_claims,
    build_report,
    claims,
    compare,
    curves,
    load_report,
    translation,
)
from mlprune.reports.verdict_markdown import claims_rows, markdown, readme_section, write_report

__all__ = ["ALPHA", "SHARED_RULE", "TARGET", "Measured", "analysis", "analysis_claims",
           "build_report", "claims", "claims_rows", "compare", "curves", "load_report",
           "markdown", "readme_section", "translation", "write_report"]
