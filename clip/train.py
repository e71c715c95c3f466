"""Train CLIP from scratch (stage 1 of 3).

    python clip/train.py                              # shapes32 preset, writes runs/clip.pt
    python clip/train.py --preset tiny --out runs/tiny
    python clip/train.py --preset tiny --out runs/tiny --resume
    torchrun --nproc_per_node=2 clip/train.py --preset tiny --out runs/ddp

The shapes dataset is generated on first use. Writes OUT/clip.pt and OUT/clip/{config.yml,
metrics.jsonl, checkpoint.pt}; evaluates retrieval on the test split at the end.
"""
from __future__ import annotations

from clip.evaluate import evaluate_clip
from clip.model import build_clip
from dalle2.cli import load_and_print_config, main_wrapper, training_parser
from dalle2.tokenizer import Tokenizer
from dalle2.training import Trainer, cleanup_distributed, init_seed, load_data, setup_distributed
from data.datasets import StepBatches, to_float


def main(argv=None):
    args = training_parser(__doc__, "clip").parse_args(argv)
    dist = setup_distributed(args.device)
    try:
        cfg = load_and_print_config(args, dist.is_main)
        train, test = load_data(cfg.data, dist)
        tc, dev = cfg.clip.train, dist.device
        # The vocabulary comes from the training captions (deterministic, so a resumed run rebuilds
        # the same one); it is saved in every checkpoint downstream.
        tokenizer = Tokenizer.build(train.captions, cfg.clip.model.context_length)
        init_seed(tc)  # same config, same initial weights
        model = build_clip(cfg.clip.model, tokenizer.vocab_size, cfg.data.image_size)
        model.tokenizer = tokenizer
        if dist.is_main:
            print(f"CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                  f"{len(train)} training images, {len(train.captions)} captions, device {dev}")
        trainer = Trainer("clip", cfg, tc, model, args.out, tokenizer=tokenizer, dist_info=dist)

        train = train.to(dev)
        tokens = tokenizer(train.captions).to(dev)  # (U, L): every caption tokenized once
        batches = StepBatches(len(train), tc.batch_size, tc.seed, dist.rank, dist.world_size)

        def get_batch(step: int) -> dict:
            images, caption_ids, _ = train.sample(batches.indices(step), batches.generator(step), cfg.data.flip)
            # labels = caption identity, so two images with the same caption are not pushed apart
            return {"images": to_float(images), "tokens": tokens[caption_ids], "labels": caption_ids.to(dev)}

        def evaluate(m, step):
            return evaluate_clip(m, test)

        trainer.fit(get_batch, resume=args.resume, overwrite=args.overwrite, time_limit=args.time_limit, evaluate=evaluate)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main_wrapper(main)()
