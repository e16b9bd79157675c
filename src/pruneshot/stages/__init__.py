"""One module per pipeline stage, each a plain function called by its ``scripts/`` entry;
``job`` is the runtime every stage runs in (logging, hashing, provenance, MLflow)."""
