"""dist_robust: distributed adversarially robust fine-tuning of image classifiers.

The Python API (docs/evaluation.md): ``evaluate_model`` (clean and robust accuracy of any model, exact on
any number of ranks), ``load_dataset`` (a registered dataset's tensors), ``load_model`` (a trained run's
model). The command line: ``python -m dist_robust --help``."""
__version__ = "0.1.0"
__all__ = ["evaluate_model", "load_dataset", "load_model"]


def __getattr__(name):
    # Imported on first use: the command line does not pay for torch's import at `import dist_robust`.
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'dist_robust' has no attribute {name!r}")


def __dir__():
    return sorted(["__version__", *__all__])
