"""Stage one: run the frozen backbone once per image into the HDF5 cache."""
