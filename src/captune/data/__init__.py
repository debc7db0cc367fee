"""Data sets on disk: training samples in any of the usual formats, their checks, the tutorial's COCO files, caption
test sets, and synthetic data."""
