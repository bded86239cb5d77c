"""The data catalog: cohort ingestion and validation, content hashes, Parquet tables, preprocessed store, lineage."""
