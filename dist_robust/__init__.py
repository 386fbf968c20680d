"""dist_robust: distributed adversarially robust fine-tuning of image classifiers."""
__version__ = "0.1.0"
__all__ = ["evaluate_model"]


def __getattr__(name):
    # Imported on first use: the command line does not pay for torch's import at `import dist_robust`.
    if name == "evaluate_model":
        from .api import evaluate_model
        return evaluate_model
    raise AttributeError(f"module 'dist_robust' has no attribute {name!r}")
