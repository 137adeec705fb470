"""The stages and what they share: preparation, extraction, head training, the live runner, and their settings."""
