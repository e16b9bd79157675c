"""What every job runs inside: MLflow runs (``tracking``) and the offline spool with its replay
(``spool``), resumable checkpoints (``checkpoint``), GPU leases (``gpus``) and provenance
(``provenance``)."""
