"""What every job runs inside: MLflow tracking and its spool (``tracking``), resumable
checkpoints (``checkpoint``), GPU leases (``gpus``) and provenance (``provenance``)."""
