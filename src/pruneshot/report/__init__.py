"""The HTML report, one concern per module:

- ``load``: reading results.csv / episodes.csv, the mixed-commit/config check, provenance, latency column names.
- ``stats``: paired Wilcoxon tests, Holm correction, Meta-Dataset ranks, replicate spread, ``mean_ci``.
- ``tables``: the report's tables as display text and the statistics behind them.
- ``figures``: the matplotlib figures (deterministic PNGs).
- ``html``: HTML/CSS assembly helpers (escaped tables, banners, captions, provenance, tables section).
- ``build``: ``render_html`` and ``build_report``, the orchestration.
- ``landing``: the landing page of Snakemake's native report (``snakemake --report``).
"""
