"""Preparation: find, unpack or download the dataset, check every image once."""
