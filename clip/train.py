"""Train CLIP from scratch (stage 1 of 3).

    python clip/train.py                              # shapes32 preset, writes runs/clip.pt
    python clip/train.py --preset tiny --out runs/tiny
    python clip/train.py --preset tiny --out runs/tiny --resume
    torchrun --nproc_per_node=2 clip/train.py --preset tiny --out runs/ddp

The shapes dataset is generated on first use. Writes OUT/clip.pt and OUT/clip/{config.yml,
metrics.jsonl, checkpoint.pt}; evaluates retrieval on the test split at the end.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from clip.evaluate import evaluate_clip
from clip.model import build_clip
from dalle2.core.cli import load_and_print_config, main_wrapper, training_parser
from dalle2.core.runtime import cleanup_distributed, setup_distributed
from dalle2.core.tokenizer import Tokenizer
from dalle2.core.training import Trainer, init_seed
from dalle2.pretrained import init_from, load_stage_weights
from data.captioned import StepBatches, to_float
from data.captions import PROMPT_VOCABULARY
from data.datasets import load_data


def vocabulary_texts(data_cfg, captions) -> list:
    """The texts the vocabulary is built from: the training captions and, for shapes, every word of the
    evaluation's prompts (dalle2.evaluation.faithfulness), so that none of them is spelled byte by byte."""
    texts = list(captions)
    if data_cfg.dataset == "shapes":
        texts += PROMPT_VOCABULARY
    return texts


def check_caption_lengths(tokenizer: Tokenizer, captions, show: bool = True) -> int:
    """Say once, naming the config key, when training captions exceed the context length (each one
    is still truncated with the tokenizer's warning). Returns the longest caption in tokens (BOS, EOS
    included)."""
    lengths = [len(tokenizer.encode(c)) + 2 for c in captions]
    longest = max(lengths, default=2)
    over = sum(n > tokenizer.context_length for n in lengths)
    if over and show:
        print(f"note: {over} of {len(lengths)} training captions are longer than clip.model.context_length="
              f"{tokenizer.context_length} tokens (longest: {longest}) and are truncated; raise it with "
              f"--set clip.model.context_length={longest}")
    return longest


def main(argv=None):
    args = training_parser(__doc__, "clip").parse_args(argv)
    dist = setup_distributed(args.device)
    try:
        cfg = load_and_print_config(args, dist.is_main)
        train, test = load_data(cfg.data, dist)
        tc, dev = cfg.clip.train, dist.device
        # The vocabulary comes from the training captions (deterministic, so a resumed run rebuilds
        # the same one); it is saved in every checkpoint downstream.
        tokenizer = Tokenizer.build(vocabulary_texts(cfg.data, train.captions), cfg.clip.model.context_length)
        init = load_stage_weights(args.init_from, "clip") if args.init_from else None
        if init and init[2]:  # the words of the model we start from, so its token embeddings keep their meaning
            tokenizer = Tokenizer.from_state_dict(init[2])
        check_caption_lengths(tokenizer, train.captions, dist.is_main)
        init_seed(tc)  # same config, same initial weights
        model = build_clip(cfg.clip.model, tokenizer.vocab_size, cfg.data.image_size)
        if args.init_from:
            init_from(model, args.init_from, "clip", asdict(cfg.clip.model), tokenizer, loaded=init)
        model.tokenizer = tokenizer
        if dist.is_main:
            print(f"CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                  f"{len(train)} training images, {len(train.captions)} captions, device {dev}")
        trainer = Trainer("clip", cfg, tc, model, args.out, tokenizer=tokenizer, dist_info=dist)

        train = train.to(dev)
        tokens = tokenizer(train.captions).to(dev)  # (U, L): every caption tokenized once
        # caption identity by string: one string can have two table entries (images whose mirrors need
        # different captions, see build_caption_table), and they are the same caption to the loss
        groups: dict = {}
        label_of = torch.tensor([groups.setdefault(c, len(groups)) for c in train.captions], device=dev)  # (U,)
        batches = StepBatches(len(train), tc.batch_size, tc.seed, dist.rank, dist.world_size, device=dist.device)

        def get_batch(step: int) -> dict:
            images, caption_ids, _ = train.sample(batches.indices(step), batches.generator(step), cfg.data.flip)
            # labels = caption identity, so two images with the same caption are not pushed apart
            return {"images": to_float(images), "tokens": tokens[caption_ids], "labels": label_of[caption_ids.to(dev)]}

        def evaluate(m, step):
            return evaluate_clip(m, test)

        trainer.fit(get_batch, resume=args.resume, overwrite=args.overwrite, time_limit=args.time_limit,
                    evaluate=evaluate)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main_wrapper(main)()
