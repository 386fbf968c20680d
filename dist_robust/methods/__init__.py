"""Training methods: each prepares the model, computes the loss of a batch, and exports the model.

A method never touches the loader or the process group, and the engine never knows which method runs.
"""
from .adv_ss import AdvJigsaw, AdvRotation, AdvSelfie, AdvSSEnsemble
from .base import Method
from .cartl import CARTLFeatureDistance, CARTLFineTune
from .pgd_at import PGDAdversarialTraining
from .standard import StandardTraining
from .trades import TRADES
from .twins import TwinsAT, TwinsTRADES

METHODS: dict[str, type[Method]] = {
    "standard": StandardTraining,   # clean CE: training from scratch or fine-tuning
    "pgd_at": PGDAdversarialTraining,  # Madry et al.: CE on PGD examples (AFT from a source)
    "trades": TRADES,                # Zhang et al.: CE(clean) + beta * KL(clean || adversarial)
    "twins_at": TwinsAT,             # Liu et al.: two BN wings, CE on adversarial halves
    "twins_trades": TwinsTRADES,     # Liu et al.: two BN wings, the TRADES loss per wing
    "cartl": CARTLFeatureDistance,   # Chen et al. stage 1: PGD-AT + feature distance at the cut (source)
    "cartl_ft": CARTLFineTune,       # Chen et al. stage 2: spectrally normalised last-k fine-tuning (target)
    "adv_rotation": AdvRotation,     # Chen et al. (Adv-SS): adversarial rotation prediction (pre-training)
    "adv_jigsaw": AdvJigsaw,         # Adv-SS: adversarial jigsaw (which permutation of the tiles)
    "adv_selfie": AdvSelfie,         # Adv-SS: adversarial selfie (which patch fills each masked position)
    "adv_ss_ensemble": AdvSSEnsemble,  # Adv-SS: pretext ensemble, joint attack + log-det diversity penalty
}


def build_method(cfg) -> Method:
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "Method", "build_method"]
