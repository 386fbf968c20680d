"""RiFT (Zhu et al., ICCV 2023) as a plug-in: its library (``core``: module robust criticality, weight
interpolation, alpha selection, their writers) and its two stage kinds with their keys and the
``lowest_mrc`` selector of ``model.modules`` (``stages``). RiFT trains with other methods (a ``train``
stage of pgd_at or standard), so it registers no method of its own."""
from . import stages  # noqa: F401  (registers rift_mrc, rift_interpolate and lowest_mrc)
