"""dist_robust: distributed adversarially robust fine-tuning of image classifiers."""
__version__ = "0.1.0"
