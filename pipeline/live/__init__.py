"""Live: backbone + head on camera, video or image frames, with the prediction drawn on each."""
