"""pruneshot.runtime.metadata: Snakemake's job records carried in a study's results (issue 15.1)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from pruneshot.runtime.metadata import VOLATILE, output_path, restore, save


def _record_path(root: Path, output: str, max_len: int = 255) -> Path:
    """Where Snakemake's file backend keeps the record of ``output`` (long names split into @-folders)."""
    b64 = base64.urlsafe_b64encode(output.encode()).decode()
    chunks = [b64[i:i + max_len - 1] for i in range(0, len(b64), max_len - 1)]
    return root.joinpath(*(["@" + c for c in chunks[:-1]] + [chunks[-1]]))


def _record(params: str) -> dict:
    return {"rule": "transfer", "input": ["a"], "log": ["l"], "params": [params], "code": "x", "shellcmd": None,
            "record_format_version": 6, "conda_env": None, "container_img_url": None, "software_stack_hash": "h",
            "job_hash": 123, "starttime": 1.5, "endtime": 2.5, "incomplete": False, "external_jobid": None,
            "input_checksums": {}}


def _write(root: Path, output: str, record: dict) -> Path:
    path = _record_path(root, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_save_carries_the_study_s_records_without_volatile_fields_and_restore_brings_them_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta, mirror = Path(".snakemake/metadata"), Path("results/s/snakemake/metadata")
    long_out = "results/s/transfer/" + "/".join(["x" * 60] * 4) + ".json"  # a name past 255 base64 chars
    outputs = ["results/s/a.json", long_out, "results/other/b.json", "results/s/gone.json"]
    for out in outputs[:3]:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("{}")
    for out in outputs:
        _write(meta, out, _record(f"p-{len(out)}"))
    assert _record_path(meta, long_out).parent != meta  # the long name is split into @-folders
    assert output_path(_record_path(meta, long_out), meta) == long_out

    assert save("results/s", mirror) == 2  # this study's existing outputs only
    carried = {output_path(p, mirror): json.loads(p.read_text()) for p in mirror.rglob("*") if p.is_file()}
    assert set(carried) == {"results/s/a.json", long_out}
    assert not set(VOLATILE) & set(carried["results/s/a.json"])
    assert carried[long_out]["params"] == [f"p-{len(long_out)}"]
    before = {p: p.stat().st_mtime_ns for p in mirror.rglob("*") if p.is_file()}
    assert save("results/s", mirror) == 0  # same records: nothing rewritten, same bytes
    assert {p: p.stat().st_mtime_ns for p in mirror.rglob("*") if p.is_file()} == before

    # a fresh checkout (no .snakemake): the records come back, times from the outputs
    fresh = Path("fresh-metadata")
    assert restore(mirror, fresh) == 2
    back = json.loads(_record_path(fresh, "results/s/a.json").read_text())
    assert back["params"] == ["p-16"] and back["starttime"] == os.stat("results/s/a.json").st_mtime
    # a record the checkout has is its own and stays; an output that is gone is not restored
    own = _write(fresh, long_out, _record("mine"))
    _record_path(fresh, "results/s/a.json").unlink()
    Path("results/s/a.json").unlink()
    assert restore(mirror, fresh) == 0
    assert json.loads(own.read_text())["params"] == ["mine"]
    # and save drops the mirrored record of an output that is gone
    save("results/s", mirror)
    assert {output_path(p, mirror) for p in mirror.rglob("*") if p.is_file()} == {long_out}
