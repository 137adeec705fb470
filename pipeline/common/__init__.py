"""What every stage shares: names, errors, settings, hardware, images and preprocessing, the backbone and its weights, checkpoints, run folders, frame sources and the dataset layout."""
