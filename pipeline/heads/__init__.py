"""Stage two: heads trained on the cached features (linear, logreg, knn), few-shot subsets and the experiment grid."""
