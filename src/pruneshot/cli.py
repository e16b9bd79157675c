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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
