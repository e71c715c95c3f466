"""CLIP trained from scratch: `CLIP`, `build_clip` and the symmetric contrastive loss."""
from clip.model import CLIP, build_clip, caption_labels, contrastive_loss

__all__ = ["CLIP", "build_clip", "caption_labels", "contrastive_loss"]
