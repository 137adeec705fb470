"""Everything the stages need besides the cache and the networks: data, preprocessing, training, live runner."""
