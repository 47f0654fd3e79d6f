"""Reports: measured results rendered as Markdown, HTML and strict JSON, apart from running.

Each module renders one kind of report from plain data (the dicts the runs return and
write), and none runs a model:

    render            the shared pieces: Markdown tables, number formats, the HTML page,
                      report.json + report.md written atomically, a report read back
    interventions     an intervention experiment's report (``mlprune intervene``)
    reproduce         ``mlprune reproduce``'s report as Markdown and HTML (its run writes it)
    verdict           the verdict's report from a folder of cells: comparisons, curves,
                      translation tests and the claims, every number recomputed
    verdict_markdown  the verdict's report as Markdown, the README's section, the claims table

``reproduce`` and ``interventions`` know nothing of the runs that make their reports, so the
runs can write them when they finish; ``verdict`` reads the verdict's cells, so it sits
above :mod:`mlprune.verdict`, whose run leaves the report to its caller.
"""
