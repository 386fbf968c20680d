"""Training methods as plug-ins: every module and package here is imported, and each registers its
methods (``base.register``) and stage kinds (``base.register_stage``) itself. Adding a method is adding
a file; ``base.py`` says what the file declares.

A method never touches the loader or the process group, and the engine never knows which method runs.
Methods never import the data layer: the engine hands a stage kind the splits it declares
(``register_stage(..., splits=...)``, passed to ``run(cfg, device, splits)``).
"""
import importlib
import pkgutil

from .base import METHODS, MODULE_SELECTORS, STAGE_KINDS, Method, MethodConfig, StageConfig

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def build_method(cfg) -> Method:
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "MODULE_SELECTORS", "STAGE_KINDS", "Method", "MethodConfig", "StageConfig", "build_method"]
