"""Prefect flows: thin wiring of `unet3d` and `data_catalog` into cached, resumable, schedulable stages."""
