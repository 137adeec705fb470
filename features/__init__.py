"""The feature cache format: one self-describing HDF5 file per split (cache.py). Imports nothing from the project."""
