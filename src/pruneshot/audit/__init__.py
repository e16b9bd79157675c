"""``pruneshot audit``: the lineage of a results row and the re-hashing of every recorded artefact."""
