"""Stages budget_one and sanity: the network checks of gate (c) and the three sanity gates
(:mod:`pruneshot.report.sanity`)."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from pruneshot.io import read_json, write_json
from pruneshot.stages.job import Job, error_text, run_ids, seeds_for


def _same(a: Any, b: Any) -> tuple[bool, str]:
    """Whether two networks are the same (architecture and every tensor), and how they differ."""
    import torch

    if a.spec != b.spec:
        return False, "architecture differs"
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False, "state keys differ"
    worst = max((float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel()), default=0.0)
    exact = all(torch.equal(sa[k], sb[k]) for k in sa)
    return exact, "every tensor equal" if exact else f"max |difference| {worst:.3g}"


def budget_one(config: dict[str, Any], replicate: int, manifest_path: Path, weights: Path, arch: Path,
               target_manifest: Path, episodes_path: Path, out: Path, job: Job,
               pretrained_metrics: Path | None = None) -> dict[str, Any]:
    """Every configured method (dense, and methods that train their network anew, aside) at budget 1.0
    on replicate ``replicate``'s pretrained network, compared with it: a source-side method's search
    result after the search stage's own BatchNorm step (and each of its variants), a target-side
    method's adapt on the first saved episode (the pretrained network with that episode's head). One
    entry per method: ``equal`` and a ``detail`` (or the error it raised). ``pretrained_metrics``: the
    pretrain record, whose recorded weights and architecture hashes are checked first."""
    from pruneshot.data import splits
    from pruneshot.methods import AdaptContext, SearchContext, get_method, options_for
    from pruneshot.models.base import load_model
    from pruneshot.models.cost import cost
    from pruneshot.stages.search import _recalibrate, load_source
    from pruneshot.stages.transfer import _episodes, _head, episode_seeds

    seeds = seeds_for(config, replicate)
    metric = config["budget"]["metric"]
    spec = read_json(arch)
    _, train, val = load_source(manifest_path)
    from pruneshot.data.episodes import verified

    if pretrained_metrics is not None:
        pre = read_json(pretrained_metrics)
        job.check_recorded(weights, pre.get("weights_sha256"), pretrained_metrics)
        job.check_recorded(arch, pre.get("arch_sha256"), pretrained_metrics)
    eps = verified(read_json(episodes_path), str(episodes_path))
    norm = read_json(manifest_path)["normalization"]
    episode = _episodes({"episodes": eps["episodes"][:1]}, splits.load_split(target_manifest, "pool", norm))[0]
    inputs = [manifest_path, weights, arch, target_manifest, episodes_path]
    rows = []
    with job.tracked(inputs, seeds, {"check": "budget_one", "replicate": replicate}) as run:
        for name in config["methods"]:
            if name == "dense":
                continue
            method = get_method(name)
            if method.trains_from_scratch:  # another dense replicate by design, not the dense network
                job.log(f"budget 1.0 {name}: not checked (it trains its network anew on the source)")
                continue
            try:
                dense = load_model(str(weights), spec)
                if method.side == "source":
                    res = method.search(SearchContext(
                        model=load_model(str(weights), spec), budget=1.0, metric=metric, source_train=train,
                        source_val=val, seed=seeds["search"], options=options_for(config, method), log=job.log))
                    nets = [res.model.eval(), *(v.eval() for v in res.variants)]
                    for net in nets:
                        _recalibrate(config, replicate, weights, spec, net, train, val)
                    checks = [_same(net, dense) for net in nets]
                    equal = all(c[0] for c in checks)
                    detail = "; ".join(c[1] for c in checks)
                    what = "search at budget 1.0" + (f" ({len(nets)} networks)" if len(nets) > 1 else "")
                else:
                    es = episode_seeds(config, replicate, eps["target"], eps["ways"], int(eps["shots"]),
                                       episode.index, [])
                    headed = _head(dense, eps["ways"], es["head"]).eval()
                    res = method.adapt(AdaptContext(
                        model=_head(dense, eps["ways"], es["head"]).eval(), budget=1.0, metric=metric,
                        support_x=episode.support[0], support_y=episode.support[1], seed=es["adapt"],
                        dense_cost=cost(headed, metric), options=options_for(config, method), log=job.log))
                    equal, detail = _same(res.model.eval(), headed)
                    what = f"adapt at budget 1.0 on episode {episode.index}"
            except Exception as exc:  # a method that cannot even run at budget 1 fails the gate
                equal, detail, what = False, f"error: {error_text(exc)}", "budget 1.0"
                job.log(f"{name}: {detail}\n{traceback.format_exc()}")
            rows.append({"method": name, "side": method.side, "check": what, "equal": equal, "detail": detail})
            job.log(f"budget 1.0 {name}: {'equal to dense' if equal else 'DIFFERS from dense'} ({detail})")
        run.log_metrics({"budget_one_equal": sum(r["equal"] for r in rows), "budget_one_checked": len(rows)}, None)
        ids = run_ids(run)
    record = {"replicate": replicate, "methods": rows, **ids,
              "provenance": job.provenance(inputs, seeds)}
    write_json(out, record)
    return record


def sanity(config: dict[str, Any], transfers: list[Path], budget_one_records: list[Path], out: Path,
           job: Job) -> dict[str, Any]:
    """The three sanity gates of the study from its dense and budget-1.0 transfer records and its
    budget-one network checks; written to ``out`` and logged one line per gate."""
    from pruneshot.report.sanity import evaluate, summary_lines

    result = evaluate([read_json(p) for p in transfers], [read_json(p) for p in budget_one_records])
    record = {"study": config["study"]["name"], **result,
              "provenance": job.provenance([*transfers, *budget_one_records], {"root": config["study"]["root_seed"]})}
    write_json(out, record)
    for line in summary_lines(result):
        job.log(line)
    return record
