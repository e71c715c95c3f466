"""Train the diffusion prior (stage 2 of 3): CLIP text embedding -> CLIP image embedding.

    python dalle2/train_prior.py                      # uses runs/clip.pt, writes runs/prior.pt
    python dalle2/train_prior.py --preset tiny --out runs/tiny [--clip PATH] [--resume]

The frozen CLIP's embeddings are computed once and cached in OUT/cache/ (keyed by the CLIP's hash).
Evaluates the sampled embeddings on the test split at the end (see dalle2/prior/evaluate.py).
"""
from __future__ import annotations

from dalle2.core.cli import main_wrapper, training_parser
from dalle2.core.runtime import cleanup_distributed
from dalle2.embeddings import prepare_stage, stage_trainer
from dalle2.prior import build_prior
from dalle2.prior.evaluate import evaluate_prior


def main(argv=None):
    args = training_parser(__doc__, "prior").parse_args(argv)
    try:
        inputs = prepare_stage(args)
        cfg, dev = inputs.cfg, inputs.dist.device
        prior, trainer, batches = stage_trainer(inputs, "prior", lambda: build_prior(cfg), args)
        # the prior trains on cached embeddings only: the CLIP's job is done
        train, emb_train, emb_test, test = inputs.train.to(dev), inputs.emb_train.to(dev), inputs.emb_test, inputs.test
        del inputs

        def get_batch(step: int) -> dict:
            idx = batches.indices(step)  # drawn on the device: no host-device sync
            _, caption_ids, flipped = train.sample(idx, batches.generator(step), cfg.data.flip)
            return {"image_emb": emb_train.image(idx, flipped), **emb_train.text(caption_ids)}

        def evaluate(model, step):
            return evaluate_prior(model, emb_test, test, steps=cfg.sampling.prior_steps,
                                  candidates=cfg.sampling.candidates,
                                  guidance_scale=cfg.sampling.prior_guidance_scale, seed=0)

        trainer.fit(get_batch, resume=args.resume, overwrite=args.overwrite, time_limit=args.time_limit,
                    evaluate=evaluate)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main_wrapper(main)()
