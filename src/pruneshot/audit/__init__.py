"""``pruneshot audit``: the lineage of a results row and the re-hashing of every recorded artefact.

- :mod:`~pruneshot.audit.records`: a study's results rows and records, the kind of each path (by the
  templates of :mod:`pruneshot.paths`), every sha256 a record or row holds of another file.
- :mod:`~pruneshot.audit.lineage`: the lineage tree of a row (transfer run, network, search, backbone,
  data, episodes, profile), each file with its hashes.
- :mod:`~pruneshot.audit.verify`: ``--verify``, every recorded hash compared with the bytes on disk.
- :mod:`~pruneshot.audit.values`: ``--verify``, every transfer summary and results row's accuracy columns
  recomputed from the per-episode accuracies (no recorded hash needed, so also without dvc.lock).
- :mod:`~pruneshot.audit.dvc`: what DVC recorded (stage outputs, ``.dir`` listings), read through DVC's API.
- :mod:`~pruneshot.audit.text`: the text of a lineage and of a verification.
"""
