"""The unCLIP decoder: CLIP image embedding (+ caption) -> image (Ramesh et al. 2022, section 2.1)."""
from dalle2.decoder.model import Decoder, UNet, build_decoder

__all__ = ["UNet", "Decoder", "build_decoder"]
