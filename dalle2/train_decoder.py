"""Train the decoder (stage 3 of 3): CLIP image embedding + caption -> image.

    python dalle2/train_decoder.py                    # uses runs/clip.pt, writes runs/decoder.pt
    python dalle2/train_decoder.py --preset tiny --out runs/tiny [--clip PATH] [--resume]

Uses the cached CLIP embeddings (OUT/cache/), trains the classifier-free-guided UNet with EMA and, every
`decoder.train.sample_every` steps and at the end, writes OUT/decoder/samples/step_NNNNNNN.png: fixed
test images (top row) and the EMA decoder's samples from their CLIP embeddings and captions (fixed seed).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dalle2.core.cli import main_wrapper, training_parser
from dalle2.core.images import captioned_grid, save_image_atomic, to_pil
from dalle2.core.runtime import cleanup_distributed
from dalle2.decoder import build_decoder
from dalle2.embeddings import prepare_stage, stage_trainer
from data.captioned import to_float

GRID_IMAGES = 8


def main(argv=None):
    args = training_parser(__doc__, "decoder").parse_args(argv)
    try:
        inputs = prepare_stage(args)
        cfg, dev, tokenizer = inputs.cfg, inputs.dist.device, inputs.clip.tokenizer
        own_text = cfg.decoder.model.text_encoder == "own"  # the decoder reads tokens, not CLIP's encodings
        decoder, trainer, batches = stage_trainer(inputs, "decoder", lambda: build_decoder(cfg, tokenizer.vocab_size),
                                                  args, init_tokenizer=tokenizer if own_text else None)
        train, emb_train, emb_test, test = inputs.train.to(dev), inputs.emb_train.to(dev), inputs.emb_test, inputs.test
        del inputs  # and with it the CLIP

        def get_batch(step: int) -> dict:
            idx = batches.indices(step)  # drawn on the device: no host-device sync
            images, caption_ids, flipped = train.sample(idx, batches.generator(step), cfg.data.flip)
            # the embedding of the view the decoder sees: flipped image <-> flipped embedding
            text = ({"tokens": emb_train.tokens[caption_ids]} if own_text else
                    {"text_enc": emb_train.text_enc[caption_ids].float(),
                     "text_mask": emb_train.text_mask[caption_ids]})
            return {"images": to_float(images), "image_emb": emb_train.image(idx, flipped), **text}

        n = min(GRID_IMAGES, len(test))
        grid_caps = [test.caption_of(i) for i in range(n)]
        grid_caps_ids = test.caption_ids[:n, 0]
        grid_text = {"text_enc": emb_test.text_enc[grid_caps_ids].float().to(dev),
                     "text_mask": emb_test.text_mask[grid_caps_ids].to(dev)}
        grid_tokens = emb_test.tokens[grid_caps_ids].to(dev)
        grid_emb = emb_test.image_emb[:n, 0].float().to(dev)
        samples_dir = Path(args.out) / "decoder" / "samples"
        s = cfg.sampling

        def sample(model, step):
            g = torch.Generator(device=dev).manual_seed(0)
            x = model.sample(grid_emb, grid_tokens, **grid_text, steps=s.steps, sampler=s.sampler, eta=s.eta,
                             guidance_scale=s.guidance_scale, generator=g,
                             clip_x0=s.clip_x0)
            real = [to_pil(test.images[i]) for i in range(n)]
            fake = [to_pil((x[i].float().cpu() + 1) / 2) for i in range(n)]
            grid = captioned_grid(real + fake, ["(real) " + c for c in grid_caps] + grid_caps, cols=n)
            save_image_atomic(grid, samples_dir / f"step_{step:07d}.png")

        trainer.fit(get_batch, resume=args.resume, overwrite=args.overwrite, time_limit=args.time_limit, sample=sample)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main_wrapper(main)()
