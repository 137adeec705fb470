"""Stage two: heads trained on the cached features (linear, logreg, knn), their one publisher (publish), few-shot
subsets and the experiment grid (experiments)."""
