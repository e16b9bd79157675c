"""The HTML report: statistics (``stats``) and the report build."""
