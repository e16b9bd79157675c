"""The HTML report, one concern per module:

- ``load``: reading results.csv / episodes.csv, the mixed-commit/config check, provenance, latency column names.
- ``stats``: paired Wilcoxon tests, Holm correction, Meta-Dataset ranks, replicate spread, ``mean_ci``.
- ``formatting``: display text of values (percent, budgets, p-values, the missing mark, CSV booleans).
- ``tables``: the report's tables as display text and the statistics behind them.
- ``reinit_gap``: inherited weights vs fresh initialisation (finetune minus reinit, paired).
- ``sanity``: the sanity gates and what every comparison shared.
- ``selection``: transfer settings chosen on validation (table, lr-sensitivity figure).
- ``styles``: one colour and marker per method, grouped by side.
- ``figures``: the matplotlib figures (deterministic PNGs).
- ``html``: HTML/CSS assembly helpers (escaped tables, banners, captions, provenance, tables section).
- ``build``: ``render_html`` and ``build_report``, the orchestration.
- ``landing``: the landing page of Snakemake's native report (``snakemake --report``).
- ``compare``: two studies' results side by side (``pruneshot compare A B``).
"""
