"""The `pruneshot` console command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("config/config.yaml")


def _study_paths(args: argparse.Namespace) -> Any:
    """The :class:`pruneshot.paths.StudyPaths` of ``--study``, else of ``--config``'s study.name, else of
    the embedded default config's."""
    from pruneshot.config import load_config
    from pruneshot.paths import StudyPaths, for_config

    if getattr(args, "study", None):
        return StudyPaths(args.study)
    return for_config(load_config(args.config if args.config is not None else DEFAULT_CONFIG))


def _rerun_failed(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from pruneshot.config import ConfigError
    from pruneshot.runtime.rerun import failed_outputs, rerun_command

    try:
        paths = _study_paths(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    outputs = failed_outputs(paths)
    if not outputs:
        print(f"no failed cells in study {paths.study}: nothing to rerun")
        return 0
    cmd = rerun_command(outputs, args.config, args.cores)
    print(f"{len(outputs)} failed job(s) in study {paths.study}:\n  " + "\n  ".join(outputs))
    print("$ " + shlex.join(cmd), flush=True)
    if args.print_only:
        return 0
    return subprocess.run(cmd).returncode


def _progress(args: argparse.Namespace) -> int:
    import os

    from pruneshot.config import ConfigError
    from pruneshot.runtime.progress import study_progress

    config = args.config or Path(DEFAULT_CONFIG)
    cores = args.cores or os.cpu_count() or 1
    try:
        progress = study_progress(config, cores)
    except (ConfigError, RuntimeError, OSError) as err:
        print(err, file=sys.stderr)
        return 2
    print(progress.line())
    if args.by_rule:
        for rule, n in sorted(progress.left_by_rule.items()):
            median = progress.median_s.get(rule)
            print(f"  {rule:<16} {n:>5} left" + (f", median {median:.1f} s per job" if median is not None else ""))
    return 0


def _summary(args: argparse.Namespace) -> int:
    import pandas as pd

    from pruneshot.config import ConfigError

    if args.results is None:
        try:
            args.results = Path(_study_paths(args).result("results_csv"))
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
    if not args.results.is_file():
        print(f"no results table at {args.results}", file=sys.stderr)
        return 2
    df = pd.read_csv(args.results)
    n_failed = int((df["status"] != "ok").sum())
    df = df[df["status"] == "ok"]
    cols = ["method", "side", "method_source", "requested_budget", "params_ratio", "target", "shots", "arm",
            "acc_mean", "acc_ci95", "n_episodes"]
    view = df[[c for c in cols if c in df.columns]].rename(columns={"method_source": "source"})
    view["acc"] = [f"{100 * m:.1f} ± {100 * c:.1f}" for m, c in zip(view.acc_mean, view.acc_ci95, strict=True)]
    view["params_ratio"] = view["params_ratio"].map(lambda v: f"{v:.3f}")
    print(view.drop(columns=["acc_mean", "acc_ci95"]).to_string(index=False))
    from pruneshot.report.tables import budget_missed_table

    missed = budget_missed_table(df)
    if not missed.empty:
        print(f"BUDGET MISSED ({len(missed)} rows beyond budget.tolerance; their accuracy is at the cost they have):")
        print(missed.to_string(index=False))
    from pruneshot.paths import RESULTS, root_of

    root = root_of(args.results, "results_csv")
    gates = root / RESULTS["sanity_json"]
    if gates.is_file():
        from pruneshot.io import read_json
        from pruneshot.report.sanity import summary_lines

        print("\n".join(summary_lines(read_json(gates))))
    else:
        print(f"sanity gates: not computed (no {gates})")
    report = root / RESULTS["report_html"]
    if report.is_file():
        print(f"report: {report}")
    study_json = root / RESULTS["study_json"]
    if study_json.is_file():
        from pruneshot.io import read_json
        from pruneshot.runtime.mlflow_client import ui_hint

        print(ui_hint(read_json(study_json)))
    if n_failed:
        from pruneshot.runtime.rerun import COMMAND

        config = f" --config {args.config}" if getattr(args, "config", None) else ""
        print(f"FAILED: {n_failed} results row(s) (listed in the report's Failures section); rerun exactly "
              f"those cells and what depends on them with: {COMMAND}{config}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    import yaml

    from pruneshot.config import ConfigError, load_config

    try:
        load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except OSError as err:
        print(f"cannot read config {args.config}: {err.strerror}", file=sys.stderr)
        return 2
    except yaml.YAMLError as err:
        print(f"config {args.config} is not valid YAML: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid")
    return 0


def _report(args: argparse.Namespace) -> int:
    """Rebuild the HTML report from existing tables (no Snakemake, no training)."""
    from pruneshot.config import ConfigError, config_hash, load_config
    from pruneshot.report.build import build_report
    from pruneshot.report.load import MixedResultsError, collect_provenance, load_results

    try:
        config = load_config(args.config) if args.config is not None else None
        paths = _study_paths(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    results_csv: Path = args.results if args.results is not None else Path(paths.result("results_csv"))
    out_dir: Path = args.out if args.out is not None else Path(paths.result("report_dir"))
    if not results_csv.is_file():
        print(f"no results table at {results_csv}", file=sys.stderr)
        return 2
    episodes = args.episodes if args.episodes is not None else results_csv.with_name("episodes.csv")
    if not episodes.is_file():
        if args.episodes is not None:
            print(f"no episodes table at {episodes}", file=sys.stderr)
            return 2
        print(f"note: {episodes} not found; the report has no paired tests", file=sys.stderr)
        episodes = None
    from pruneshot.io import read_json
    from pruneshot.paths import RESULTS, fill, root_of

    root = root_of(results_csv, "results_csv")
    study, config_sha, allow_mixed = None, None, args.allow_mixed
    if config is not None:
        study, config_sha = config["study"]["name"], config_hash(config)
        allow_mixed = allow_mixed or bool(config.get("report", {}).get("allow_mixed", False))
    pools = root.glob(fill(RESULTS["target_manifest"], target="*"))
    manifests = {"source": root / RESULTS["source_manifest"], **{p.parent.name: p for p in sorted(pools)}}
    prov = collect_provenance(load_results(results_csv), study=study, config_sha256=config_sha,
                              study_json=root / RESULTS["study_json"], sync_json=root / RESULTS["sync_json"],
                              manifests=manifests)
    out_html = out_dir / "index.html"
    try:
        gates = root / RESULTS["sanity_json"]
        build_report(results_csv, prov, out_html, out_dir / "figures", episodes, allow_mixed=allow_mixed,
                     sanity=read_json(gates) if gates.is_file() else None)
    except MixedResultsError as err:
        print(err, file=sys.stderr)
        return 3
    print(f"report: {out_html.resolve()}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    import json

    from pruneshot.audit import records, text
    from pruneshot.audit.dvc import DvcOutputs
    from pruneshot.audit.lineage import lineage
    from pruneshot.audit.verify import verify
    from pruneshot.paths import StudyPaths

    root: Path = args.root
    target: str | None = args.row
    results: Path | None = root / args.results if args.results is not None else None  # relative to --root
    if target is not None and target.endswith(".csv"):  # a results file (relative to here): every row of it
        results, target = Path(target).resolve(), None
    try:
        study = args.study
        if study is None and results is not None:
            study = records.study_of_path(root, results, "results_csv")
        if study is None and target is not None and target.endswith(".json"):
            study = records.study_of_path(root, target if Path(target).exists() else root / target, "transfer")
        paths = StudyPaths(study or records.default_study(root, args.config))
        if not (root / paths.results_root).is_dir():
            raise records.AuditError(f"no results of study {paths.study!r}: {root / paths.results_root} does not "
                                     "exist", records.studies(root), label="studies with results here")
        results_rel = records.rel_path(root, results if results is not None else paths.result("results_csv"))
        if args.verify and target is None:
            result = verify(root, paths, results_rel, config=args.config)
            print(json.dumps(result.as_dict(), indent=2) if args.json else text.format_verify(result))
            return 0 if result.ok else 1
        rows = records.read_results(root / results_rel)
        if target is None:
            chosen = rows
        elif target.endswith(".json"):  # a transfer record: the rows it produced
            record = Path(target)
            if not record.is_absolute() and not record.exists():
                record = root / record
            chosen = records.rows_for_transfer_record(rows, root, record)
            if not chosen:
                raise records.AuditError(f"no row of {results_rel} comes from transfer record {target}")
        else:
            chosen = records.find_rows(rows, target)
    except records.AuditError as err:
        print(f"pruneshot audit: {err}", file=sys.stderr)
        if err.candidates:
            print(f"{err.label}: " + ", ".join(err.candidates), file=sys.stderr)
        return 2
    if args.verify:
        result = verify(root, paths, results_rel, rows=chosen, config=args.config)
        scope = f"the lineage of {len(chosen)} row(s)"
        print(json.dumps(result.as_dict(), indent=2) if args.json else text.format_verify(result, scope))
        return 0 if result.ok else 1
    hasher = records.Hasher(root)
    dvc = DvcOutputs(root, hasher)
    lineages = [lineage(root, row, paths, results_rel, hasher=hasher, dvc=dvc, config=args.config) for row in chosen]
    if args.json:
        print(json.dumps({"study": paths.study, "results": results_rel, "rows": lineages}, indent=2, default=str))
    else:
        short = args.short or (not args.long and len(lineages) > 1)  # several rows: one line per level
        print(("\n" if short else "\n\n").join((text.format_lineage_short if short else text.format_lineage)(lin)
                                                for lin in lineages))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pruneshot.report.compare import CompareError, compare_results, filter_rows, format_comparison, load_study

    try:
        a, b = load_study(args.a), load_study(args.b)
        table = compare_results(filter_rows(a.results, args.method, args.arm),
                                filter_rows(b.results, args.method, args.arm), a.episodes, b.episodes,
                                a.episode_ids, b.episode_ids)
    except CompareError as err:
        print(f"pruneshot compare: {err}", file=sys.stderr)
        return 2
    for study in (a, b):
        if study.episodes is None:
            print(f"note: {study.label} has no episodes.csv: its cells are not paired", file=sys.stderr)
    print(format_comparison(table, a.label, b.label))
    if args.csv is not None:
        try:
            table.to_csv(args.csv, index=False)
        except OSError as err:
            print(f"pruneshot compare: cannot write {args.csv}: {err}", file=sys.stderr)
            return 2
        print(f"table: {args.csv}")
    return 0


def _study_options(p: argparse.ArgumentParser, config_note: str = "") -> None:
    p.add_argument("--study", default=None, help="the study (its results under results/NAME/); "
                                                 "default: study.name of --config")
    p.add_argument("--config", type=Path, default=None,
                   help=f"the study config (default: {DEFAULT_CONFIG}){config_note}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pruneshot` command."""
    parser = argparse.ArgumentParser(prog="pruneshot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="print the results table (mean ± 95%% CI, in %%)")
    p.add_argument("results", type=Path, nargs="?", default=None,
                   help="a results table (default: results/STUDY/tables/results.csv)")
    _study_options(p)
    p.set_defaults(func=_summary)
    p = sub.add_parser("validate", help="validate a config file against the schema")
    p.add_argument("config", type=Path)
    p.set_defaults(func=_validate)
    p = sub.add_parser("audit", help="the lineage of a results row; --verify re-hashes every artefact",
                       description="Print the lineage of a number in the results table (transfer run, pruned "
                                   "network, search, pretrained backbone, data, episodes, profile: paths, sha256, "
                                   "MLflow runs, seeds, rules, commits, configs), or with --verify re-hash every "
                                   "artefact and compare with the records and dvc.lock, and recompute every "
                                   "transfer summary and results row's accuracy columns from the per-episode "
                                   "accuracies (exit 1 on a mismatch).")
    p.add_argument("row", nargs="?", metavar="ROW_ID",
                   help="a row_id (or a unique prefix), a transfer record (.json) or a results file (.csv); "
                        "default: every row")
    p.add_argument("--study", default=None,
                   help="the study (its results under results/NAME/); default: study.name of --config")
    p.add_argument("--config", type=Path, default=None,
                   help="the study config (default: config/config.yaml under --root): its study.name, and its hash "
                        "now compared with the run's")
    p.add_argument("--results", type=Path, default=None,
                   help="the results table (relative to --root; default: results/STUDY/tables/results.csv)")
    p.add_argument("--root", type=Path, default=Path("."), help="the project directory")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the artefacts (of ROW_ID's lineage, else all) and compare with the recorded hashes; "
                        "recompute the transfer summaries and results rows' accuracy columns and compare")
    brief = p.add_mutually_exclusive_group()
    brief.add_argument("--short", action="store_true",
                       help="per row, the head line and one line per lineage level (record, rule, MLflow run, "
                            "whether its recorded hashes match); the default when several rows are audited")
    brief.add_argument("--long", action="store_true",
                       help="per row, the whole tree: every file, its sha256 and every hash recorded for it; "
                            "the default for one row")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_audit)
    p = sub.add_parser("report", help="rebuild the HTML report from existing tables (no Snakemake)")
    p.add_argument("--results", type=Path, default=None,
                   help="the results table (default: results/STUDY/tables/results.csv)")
    p.add_argument("--episodes", type=Path, default=None,
                   help="per-episode accuracies (default: episodes.csv beside --results)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for index.html and figures/ (default: results/STUDY/report)")
    _study_options(p, "; its name, hash and report.allow_mixed go into the report")
    p.add_argument("--allow-mixed", action="store_true",
                   help="build even when results come from several commits or config hashes (with a warning)")
    p.set_defaults(func=_report)
    p = sub.add_parser("rerun-failed", help="rerun exactly the study's failed cells and what depends on them",
                       description="Force the jobs whose records say failed (a failed search, else a failed "
                                   "transfer) with snakemake --forcerun; Snakemake reruns what depends on them "
                                   "(profile, aggregate, report) and nothing else.")
    p.add_argument("--config", type=Path, default=None,
                   help="the study's config file (default: config/config.yaml)")
    p.add_argument("--cores", default="all", help="snakemake --cores (default: all)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the failed jobs' outputs and the command, run nothing")
    p.set_defaults(func=_rerun_failed)
    p = sub.add_parser("progress", help="a study's progress: jobs done / running / left, elapsed, time left",
                       description="One line for the study of --config: jobs done, running and left (Snakemake "
                                   "dry runs, which work beside a running workflow), the time since the newest run "
                                   "started, and the time left estimated from the benchmark files of the study's "
                                   "finished jobs of each rule (median per rule, --cores jobs at once). Run it from "
                                   "the project root, e.g. in a second terminal or with `watch`.")
    p.add_argument("--config", type=Path, default=None,
                   help=f"the study's config file (default: {DEFAULT_CONFIG})")
    p.add_argument("--cores", type=int, default=None, help="jobs that run at once (default: this machine's cores)")
    p.add_argument("--by-rule", action="store_true", help="also the jobs left and median time per rule")
    p.set_defaults(func=_progress)
    p = sub.add_parser("compare", help="two studies' results side by side, with paired tests where they share "
                                       "episodes",
                       description="Match the cells (method, budget, target, ways, shots, arm, replicate) of two "
                                   "studies and print acc A, acc B and B − A (pp). Cells evaluated on the same "
                                   "episodes (same seed_episode, n_episodes and episodes file content) get a "
                                   "two-sided Wilcoxon signed-rank test on the per-episode accuracies, "
                                   "Holm-adjusted over all paired cells; other cells the difference only.")
    p.add_argument("a", metavar="A", help="a study results directory (results/NAME), a study name, or a results.csv")
    p.add_argument("b", metavar="B", help="the same for the other study")
    p.add_argument("--csv", type=Path, default=None,
                   help="write the full table here (accuracies and B − A as fractions, p-values, notes)")
    p.add_argument("--method", action="append", default=None, help="only this method (repeatable)")
    p.add_argument("--arm", action="append", default=None, help="only this arm (repeatable)")
    p.set_defaults(func=_compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
