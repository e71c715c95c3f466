"""A training step must never make the host wait for the GPU. On the CPU the waits themselves cannot be
seen, so these tests watch the operations that cause them on CUDA: reading a tensor's value on the host
(`.item()`, `bool(t)`, `int(t)`: aten._local_scalar_dense) and data-dependent shapes (nonzero,
masked_select, unique: the host must learn the size). The batch sampler, the CLIP embeddings lookup and
every stage's loss are run under a dispatch mode that records them."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from data.captioned import CaptionedImages, StepBatches, build_caption_table

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
           "unique_consecutive", "nonzero_static", "masked_scatter", "repeat_interleave"}


class RecordSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _dataset(n=40, size=8):
    caps = [[f"a red circle at the {'left' if i % 2 else 'right'}", "a red circle"] if i % 3 else ["a blue square"]
            for i in range(n)]
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    return CaptionedImages(images, *build_caption_table(caps))


def test_recorder_catches_a_sync():
    # the instrument itself: the old sampler found the flipped rows with nonzero() and would be caught
    with RecordSyncs() as rec:
        (torch.rand(5) < 0.5).nonzero()
        bool(torch.ones(()) > 0)
    assert rec.seen == ["nonzero", "_local_scalar_dense"]


def test_batch_sampling_has_no_sync():
    ds = _dataset()
    batches = StepBatches(len(ds), 16, seed=0, device="cpu")
    with RecordSyncs() as rec:
        for step in range(5):  # crosses an epoch boundary (40 images, 16 per step)
            idx = batches.indices(step)
            images, cap, flipped = ds.sample(idx, batches.generator(step), flip=True)
    assert rec.seen == []
    assert images.shape == (16, 3, 8, 8) and cap.shape == (16,) and flipped.dtype == torch.bool
    assert batches.generator(0).device == batches.indices(0).device == torch.device("cpu")


def test_stage_losses_have_no_sync():
    (prior, prior_batch), (decoder, decoder_batch) = _tiny_stages()
    with RecordSyncs() as rec:
        prior.loss(**prior_batch).backward()
        decoder.loss(**decoder_batch).backward()
    assert rec.seen == []


def _tiny_stages():
    from dalle2.decoder.model import Decoder, UNet
    from dalle2.diffusion import GaussianDiffusion
    from dalle2.prior.model import DiffusionPrior, PriorNetwork
    torch.manual_seed(0)
    n, e, L, w = 4, 32, 8, 16
    prior = DiffusionPrior(PriorNetwork(embed_dim=e, text_width=w, context_length=L, width=32, layers=1, heads=2),
                           GaussianDiffusion(timesteps=50, objective="x0")).train()
    unet = UNet(image_size=8, embed_dim=e, vocab_size=20, context_length=L, channels=16, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(4,), head_channels=16, text_encoder="own", text_width=16,
                text_layers=1, text_heads=2)
    decoder = Decoder(unet, GaussianDiffusion(timesteps=50, objective="v", loss_weighting="min_snr")).train()
    emb = F.normalize(torch.randn(n, e), dim=-1)
    prior_batch = {"image_emb": emb, "text_emb": emb, "text_enc": torch.randn(n, L, w),
                   "text_mask": torch.ones(n, L, dtype=torch.bool)}
    decoder_batch = {"images": torch.rand(n, 3, 8, 8) * 2 - 1, "image_emb": emb,
                     "tokens": torch.randint(1, 20, (n, L))}
    return (prior, prior_batch), (decoder, decoder_batch)


@pytest.mark.e2e
def test_compiled_training_step_has_no_graph_break():
    # train.compile=true compiles the loss wrapper; the schedule-array device cache used to break the graph
    # at every lookup (9 breaks in the prior's step, 13 in the decoder's).
    from dalle2.core.training import _Objective
    torch._dynamo.reset()
    for model, batch in _tiny_stages():
        for _ in range(2):  # the first call fills the device cache, the second finds it
            explained = torch._dynamo.explain(_Objective(model))(batch)
            assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
            assert explained.graph_count == 1
