"""The `pruneshot` console command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _summary(args: argparse.Namespace) -> int:
    import pandas as pd

    df = pd.read_csv(args.results)
    df = df[df["status"] == "ok"]
    cols = ["method", "side", "method_source", "requested_budget", "params_ratio", "target", "shots", "arm",
            "acc_mean", "acc_ci95", "n_episodes"]
    view = df[[c for c in cols if c in df.columns]].rename(columns={"method_source": "source"})
    view["acc"] = [f"{100 * m:.1f} ± {100 * c:.1f}" for m, c in zip(view.acc_mean, view.acc_ci95, strict=True)]
    view["params_ratio"] = view["params_ratio"].map(lambda v: f"{v:.3f}")
    print(view.drop(columns=["acc_mean", "acc_ci95"]).to_string(index=False))
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
    from pruneshot.report.build import MixedResultsError, build_report, collect_provenance, load_results

    results_csv: Path = args.results
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
    root = results_csv.resolve().parent.parent  # results/tables/results.csv -> results/
    study, config_sha, allow_mixed = None, None, args.allow_mixed
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        study, config_sha = config["study"]["name"], config_hash(config)
        allow_mixed = allow_mixed or bool(config.get("report", {}).get("allow_mixed", False))
    manifests = {"source": root / "data/source/manifest.json",
                 **{p.parent.name: p for p in sorted((root / "data/target").glob("*/manifest.json"))}}
    prov = collect_provenance(load_results(results_csv), study=study, config_sha256=config_sha,
                              study_json=root / "mlflow/study.json", sync_json=root / "mlflow/sync.json",
                              manifests=manifests)
    out_html = args.out / "index.html"
    try:
        build_report(results_csv, prov, out_html, args.out / "figures", episodes, allow_mixed=allow_mixed)
    except MixedResultsError as err:
        print(err, file=sys.stderr)
        return 3
    print(f"report: {out_html.resolve()}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    import json

    from pruneshot.audit import lineage as audit

    root = args.root
    results = (root / args.results).resolve()  # --results is relative to --root
    target = args.row
    if target is not None and target.endswith(".csv"):  # a results file (relative to here): every row of it
        results, target = Path(target).resolve(), None
    if args.verify and target is None:
        result = audit.verify(root, results)
        print(json.dumps(result.as_dict(), indent=2) if args.json else audit.format_verify(result))
        return 0 if result.ok else 1
    try:
        rows = audit.read_results(results)
        if target is None:
            chosen = rows
        elif target.endswith(".json"):  # a transfer record: the rows it produced
            record = Path(target)
            if not record.is_absolute() and not record.exists():
                record = root / record
            chosen = audit.rows_for_transfer_record(rows, root, record)
            if not chosen:
                raise audit.AuditError(f"no row of {results} comes from transfer record {target}")
        else:
            chosen = audit.find_rows(rows, target)
    except audit.AuditError as err:
        print(f"pruneshot audit: {err}", file=sys.stderr)
        if err.candidates:
            print(f"{err.label}: " + ", ".join(err.candidates), file=sys.stderr)
        return 2
    if args.verify:
        result = audit.verify(root, results, rows=chosen)
        scope = f"the lineage of {len(chosen)} row(s)"
        print(json.dumps(result.as_dict(), indent=2) if args.json else audit.format_verify(result, scope))
        return 0 if result.ok else 1
    hasher = audit.Hasher(root)
    dvc = audit.DvcLock(root, hasher)
    lineages = [audit.lineage(root, row, results, hasher=hasher, dvc=dvc) for row in chosen]
    if args.json:
        print(json.dumps({"results": str(results), "rows": lineages}, indent=2, default=str))
    else:
        print("\n\n".join(audit.format_lineage(lin) for lin in lineages))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pruneshot` command."""
    parser = argparse.ArgumentParser(prog="pruneshot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="print the results table (mean ± 95%% CI, in %%)")
    p.add_argument("results", type=Path, nargs="?", default=Path("results/tables/results.csv"))
    p.set_defaults(func=_summary)
    p = sub.add_parser("validate", help="validate a config file against the schema")
    p.add_argument("config", type=Path)
    p.set_defaults(func=_validate)
    p = sub.add_parser("audit", help="the lineage of a results row; --verify re-hashes every artefact",
                       description="Print the lineage of a number in the results table (transfer run, pruned "
                                   "network, search, pretrained backbone, data, episodes, profile: paths, sha256, "
                                   "MLflow runs, seeds, rules, commits, configs), or with --verify re-hash every "
                                   "artefact and compare with the records and dvc.lock (exit 1 on a mismatch).")
    p.add_argument("row", nargs="?", metavar="ROW_ID",
                   help="a row_id (or a unique prefix), a transfer record (.json) or a results file (.csv); "
                        "default: every row")
    p.add_argument("--results", type=Path, default=Path("results/tables/results.csv"),
                   help="the results table (relative to --root)")
    p.add_argument("--root", type=Path, default=Path("."), help="the project directory")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the artefacts (of ROW_ID's lineage, else all) and compare with the recorded hashes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_audit)
    p = sub.add_parser("report", help="rebuild the HTML report from existing tables (no Snakemake)")
    p.add_argument("--results", type=Path, default=Path("results/tables/results.csv"))
    p.add_argument("--episodes", type=Path, default=None,
                   help="per-episode accuracies (default: episodes.csv beside --results)")
    p.add_argument("--out", type=Path, default=Path("results/report"), help="folder for index.html and figures/")
    p.add_argument("--config", type=Path, default=None,
                   help="the study config: its name, hash and report.allow_mixed go into the report")
    p.add_argument("--allow-mixed", action="store_true",
                   help="build even when results come from several commits or config hashes (with a warning)")
    p.set_defaults(func=_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
