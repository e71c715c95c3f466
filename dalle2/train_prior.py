"""Train the diffusion prior (stage 2 of 3): CLIP text embedding -> CLIP image embedding.

    python dalle2/train_prior.py                      # uses runs/clip.pt, writes runs/prior.pt
    python dalle2/train_prior.py --preset tiny --out runs/tiny [--clip PATH] [--resume]

The frozen CLIP's embeddings are computed once and cached in OUT/cache/ (keyed by the CLIP's hash).
Evaluates the sampled embeddings on the test split at the end (see dalle2/prior/evaluate.py).
"""
from __future__ import annotations

from dataclasses import asdict

from dalle2.core.cli import main_wrapper, training_parser
from dalle2.core.runtime import cleanup_distributed
from dalle2.core.training import Trainer, init_seed
from dalle2.embeddings import prepare_stage
from dalle2.pretrained import init_from
from dalle2.prior import build_prior
from dalle2.prior.evaluate import evaluate_prior
from data.captioned import StepBatches


def main(argv=None):
    args = training_parser(__doc__, "prior").parse_args(argv)
    try:
        inputs = prepare_stage(args)
        dist, cfg, clip, clip_hash = inputs.dist, inputs.cfg, inputs.clip, inputs.clip_hash
        train, test, emb_train, emb_test = inputs.train, inputs.test, inputs.emb_train, inputs.emb_test
        dev, tc = dist.device, cfg.prior.train
        init_seed(tc)  # same config, same initial weights
        prior = build_prior(cfg)
        if dist.is_main:
            print(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters, "
                  f"CLIP {clip_hash}, {len(train)} training images")
        if args.init_from:  # a fresh optimizer and schedule on top of earlier weights
            init_from(prior, args.init_from, "prior", asdict(cfg.prior.model),
                      None)
        trainer = Trainer("prior", cfg, tc, prior, args.out, tokenizer=clip.tokenizer,
                          extra={"clip_hash": clip_hash}, dist_info=dist)
        del clip  # the prior trains on cached embeddings only
        emb_train, train = emb_train.to(dev), train.to(dev)
        batches = StepBatches(len(train), tc.batch_size, tc.seed, dist.rank, dist.world_size, device=dev)

        def get_batch(step: int) -> dict:
            idx = batches.indices(step)  # drawn on the device: no host-device sync
            _, caption_ids, flipped = train.sample(idx, batches.generator(step), cfg.data.flip)
            return {"image_emb": emb_train.image(idx, flipped), **emb_train.text(caption_ids)}

        def evaluate(model, step):
            return evaluate_prior(model, emb_test, test, steps=cfg.sampling.prior_steps,
                                  candidates=cfg.sampling.candidates,
                                  guidance_scale=cfg.sampling.prior_guidance_scale, seed=0)

        trainer.fit(get_batch, resume=args.resume, overwrite=args.overwrite, time_limit=args.time_limit, evaluate=evaluate)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main_wrapper(main)()
