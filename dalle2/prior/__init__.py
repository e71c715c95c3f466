"""The DALL-E 2 diffusion prior: caption -> CLIP image embedding (Ramesh et al. 2022, section 2.2)."""
from dalle2.prior.model import DiffusionPrior, PriorNetwork, build_prior

__all__ = ["DiffusionPrior", "PriorNetwork", "build_prior"]
