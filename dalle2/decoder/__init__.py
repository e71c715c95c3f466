"""The unCLIP decoder: CLIP image embedding (+ caption) -> image (Ramesh et al. 2022, section 2.1)."""
from .unet import Decoder, UNet

__all__ = ["UNet", "Decoder"]
