"""The feature cache: the HDF5 format (cache.py) and the extraction stage that fills it (extract.py)."""
