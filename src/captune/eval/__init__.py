"""Captioning and scoring: batched generation, the evaluation run, the official COCO scorers, the HTML report."""
