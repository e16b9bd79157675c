"""Text of the audit: a lineage as an indented tree (in full, or one line per level), a verification as
mismatch lines and a summary."""

from __future__ import annotations

from typing import Any

from pruneshot.audit.values import ValueMismatch
from pruneshot.audit.verify import Mismatch, VerifyResult


def mismatch_line(m: Mismatch) -> str:
    """One human-readable line for a mismatch."""
    who = "; ".join(m.by)
    if m.actual is None and m.expected is None:
        return f"MISSING  {m.path} (part of {who})"
    if m.actual is None:
        return f"MISSING  {m.path}: {m.algo} {m.expected} recorded by {who}"
    if m.expected is None:
        return f"EXTRA    {m.path}: {m.algo} {m.actual}, not in {who}"
    return f"MISMATCH {m.path}: {m.algo} recorded {m.expected}, actual {m.actual} (recorded by {who})"


def value_line(m: ValueMismatch) -> str:
    """One human-readable line for a recomputed value that disagrees with the recorded one."""
    return (f"MISMATCH {m.path}: {m.field} recorded {_shown(m.recorded)}, recomputed {_shown(m.recomputed)} "
            f"(from {m.source})")


def _shown(value: Any) -> str:
    if value is None or value == "":
        return "(empty)"
    return repr(value) if isinstance(value, str) and not _is_number(value) else str(value)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _num(value: str | None, scale: float = 1.0, fmt: str = ".3f") -> str:
    try:
        return format(scale * float(value), fmt)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"


def _pct(value: str | None) -> str:
    return _num(value, 100.0, ".1f")


def format_lineage(lin: dict[str, Any]) -> str:
    """The lineage as an indented tree of text."""
    row = lin["row"]
    lines = [
        f"row {row['row_id']}: {row.get('method')} at budget {row.get('requested_budget')} "
        f"({row.get('budget_metric', 'params')}), target {row.get('target')}, {row.get('ways')}-way "
        f"{row.get('shots')}-shot, arm {row.get('arm')}, replicate {row.get('replicate')}",
        f"  accuracy {_pct(row.get('acc_mean'))} ± {_pct(row.get('acc_ci95'))} % (mean ± 95% CI over "
        f"{row.get('n_episodes')} episodes); params ratio {_num(row.get('params_ratio'))}, flops ratio "
        f"{_num(row.get('flops_ratio'))}",
    ]
    commit, config_sha = row.get("git_commit"), row.get("config_sha256")
    dirty = " (dirty)" if str(row.get("git_dirty")).lower() == "true" else ""
    lines.append(f"  produced at commit {commit}{dirty} with config sha256 {config_sha}")
    head, now = lin["project"]["git_head"], lin["project"]["config_sha256"]
    if head:
        lines.append(f"  project HEAD now {head} ({'same' if head == commit else 'a different'} commit)")
    if now:
        lines.append(f"  {lin['project'].get('config', 'config/config.yaml')} now hashes to {now} "
                     + ("(same)" if now == config_sha else "(differs: a setting or the schema's defaults changed)"))
    lines += _format_files([lin["results_file"]], "  ")
    lines.append("")
    _format_node(lin["tree"], 0, lines, row.get("acc_mean"))
    return "\n".join(lines)


def format_lineage_short(lin: dict[str, Any]) -> str:
    """The lineage in brief: the head line (the row, its accuracy, its commit against HEAD now; the results
    table's dvc.lock hash if it differs), then one
    line per lineage level (transfer run, pruned network, search, backbone, data, episodes, profile), each
    with its record, rule, MLflow run and how many recorded hashes of its files match; a level already
    listed is not repeated. Every mismatch, missing file or differing accuracy is still named."""
    row = lin["row"]
    commit, head = row.get("git_commit"), lin["project"]["git_head"]
    at = f"commit {str(commit)[:12]}" + (" (dirty)" if str(row.get("git_dirty")).lower() == "true" else "")
    if head and head != commit:
        at += ", not HEAD"
    lines = [f"row {row['row_id']}: {row.get('method')} b{row.get('requested_budget')} {row.get('target')} "
             f"{row.get('ways')}-way {row.get('shots')}-shot {row.get('arm')} r{row.get('replicate')}: "
             f"{_pct(row.get('acc_mean'))} ± {_pct(row.get('acc_ci95'))} % ({at})"]
    if lin["results_file"]["recorded"] and "MISMATCH" in (results := _hash_summary([lin["results_file"]])):
        lines[0] += f"; results table {results}"
    _short_node(lin["tree"], 1, lines, row)
    return "\n".join(lines)


def _hash_summary(files: list[dict[str, Any]]) -> str:
    """'N recorded hashes ok', or the files and hashes that do not match."""
    bad = [f"{f['path']} MISSING" for f in files if not f["sha256"]]
    recorded = [(f, r) for f in files if f["sha256"] for r in f["recorded"]]
    bad += list(dict.fromkeys(f"{f['path']} {r['algo']} MISMATCH" for f, r in recorded if not r["ok"]))
    n = len(recorded)
    if bad:
        return "; ".join(bad)
    return f"{n} recorded hash{'es' if n != 1 else ''} ok" if n else "no recorded hash"


def _short_node(node: dict[str, Any], depth: int, lines: list[str], row: dict[str, Any]) -> None:
    if "see_above" in node:  # listed already
        return
    parts = []
    if node.get("rule"):
        parts.append(f"rule {node['rule']}")
    if node.get("mlflow_run_id"):
        parts.append(f"mlflow {node['mlflow_run_id']}")
    if node.get("git_commit") and node["git_commit"] != row.get("git_commit"):
        parts.append(f"commit {str(node['git_commit'])[:12]} (not the row's)")
    if "record_acc_mean" in node and _num(node["record_acc_mean"], fmt=".12g") != _num(row.get("acc_mean"),
                                                                                         fmt=".12g"):
        parts.append(f"record accuracy {node['record_acc_mean']} DIFFERS from the row's")
    if not node.get("rule") and node.get("note"):  # no record, or one without provenance
        parts.append(node["note"])
    parts.append(_hash_summary(node.get("files", [])))
    lines.append(f"{'  ' * depth}{node['level']}: {node.get('record') or '-'}: " + ", ".join(parts))
    for child in node.get("children", []):
        _short_node(child, depth + 1, lines, row)


def _format_files(files: list[dict[str, Any]], pad: str) -> list[str]:
    out = []
    for f in files:
        out.append(f"{pad}file {f['path']}")
        out.append(f"{pad}    sha256 {f['sha256'] or 'MISSING'}")
        for r in f["recorded"]:
            status = "ok      " if r["ok"] else "MISMATCH"
            out.append(f"{pad}    {status} {r['algo']} {r['hash']}  recorded by {r['by']}")
    return out


def _format_node(node: dict[str, Any], depth: int, lines: list[str], row_acc: str | None = None) -> None:
    pad = "    " * depth
    if "see_above" in node:
        lines.append(f"{pad}- {node['level']}: {node['see_above']} (shown above)")
        return
    title = f"{pad}- {node['level']}"
    if node.get("record"):
        title += f": {node['record']}"
    lines.append(title)
    sub = pad + "    "
    if node.get("rule"):
        wc = node.get("wildcards") or {}
        lines.append(f"{sub}rule {node['rule']}" + (f" ({', '.join(f'{k}={v}' for k, v in wc.items())})"
                                                    if wc else ""))
    if node.get("method"):
        extra = f", {node['method_provenance']}" if node.get("method_provenance") else ""
        lines.append(f"{sub}method {node['method']} ({node.get('side')}-side{extra})")
    if node.get("dataset"):
        ds = node["dataset"]
        lines.append(f"{sub}dataset {ds.get('dataset')} split {ds.get('split')} classes {ds.get('classes')} "
                     f"images {ds.get('image_shape')}")
    if node.get("episodes"):
        e = node["episodes"]
        lines.append(f"{sub}{e['count']} episodes, {e['ways']}-way {e['shots']}-shot, "
                     f"{e['queries_per_class']} queries per class")
    if node.get("network"):
        lines.append(f"{sub}timed network: {node['network']}")
    if "record_acc_mean" in node:
        same = _num(node["record_acc_mean"], fmt=".12g") == _num(row_acc, fmt=".12g")
        n = f" over {node['record_episodes']} episodes" if node.get("record_episodes") else ""
        lines.append(f"{sub}accuracy in the record: {node['record_acc_mean']}{n} "
                     + ("(as in the results row)" if same else f"(DIFFERS from the results row's {row_acc})"))
    if node.get("mlflow_logged"):
        run = node.get("mlflow_run_id") or "none (not logged yet: sync_tracking logs it after the last job)"
        text = f"{sub}mlflow run {run}"
        if node.get("upstream_run_id"):
            text += f", upstream run {node['upstream_run_id']}"
        lines.append(text)
    elif node.get("rule"):
        lines.append(f"{sub}mlflow run none (rule {node['rule']} logs no MLflow run)")
    if node.get("seeds") is not None:
        lines.append(f"{sub}seeds " + (", ".join(f"{k}={v}" for k, v in node["seeds"].items()) or "none"))
    if node.get("git_commit"):
        lines.append(f"{sub}commit {node['git_commit']}" + (" (dirty)" if node.get("git_dirty") else " (clean)")
                     + f", config sha256 {node.get('config_sha256')}")
    if node.get("note"):
        lines.append(f"{sub}({node['note']})")
    for sf in node.get("source_files") or []:
        lines.append(f"{sub}raw {sf.get('file')} sha256 {sf.get('sha256')}")
    lines += _format_files(node.get("files", []), sub)
    for child in node.get("children", []):
        _format_node(child, depth + 1, lines, row_acc)


def format_verify(result: VerifyResult, scope: str = "every artefact") -> str:
    """Mismatch lines, then a one-line summary."""
    lines = [mismatch_line(m) for m in result.mismatches]
    lines += [value_line(m) for m in result.value_mismatches]
    lines += [f"ERROR    {e}" for e in result.errors]
    lines += [f"note: {n}" for n in result.notes]
    values = f"{result.recomputed} recomputed values"
    bad = len(result.mismatches) + len(result.value_mismatches)
    if result.ok:
        lines.append(f"verified {result.artefacts} artefacts ({scope}) against {result.claims} recorded hashes and "
                     f"{values}: all match")
    elif not bad:
        lines.append(f"verification incomplete: {len(result.errors)} error(s); {result.claims} recorded hashes "
                     f"compared among {result.artefacts} artefacts ({scope}) and {values}, all match")
    else:
        lines.append(f"{bad} mismatch(es) among {result.artefacts} artefacts ({scope}): {result.claims} recorded "
                     f"hashes compared ({len(result.mismatches)} differ), {values} "
                     f"({len(result.value_mismatches)} differ)")
    return "\n".join(lines)
