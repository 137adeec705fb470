"""What every stage shares: names, errors, settings, hardware, the preprocessing, the head checkpoint, and reading a
file torch saved (weights-only)."""
