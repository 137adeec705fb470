"""Live: backbone + head on camera, video or image frames, with the prediction drawn on each; its export and
torch-free runtimes; and collecting frames of a class (run_webcam.py --collect)."""
