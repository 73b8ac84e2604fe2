r"""A minimal, runnable training loop on a cachebuild latent cache: a tiny UNet learns to predict noise.

It shows the whole reading side in one screen: ``open_cache``, the bucket sampler (every batch one shape),
a DataLoader with worker processes, scaled latents, the flip augmentation, and epochs that reshuffle.
It runs on a CPU (20 steps take about a minute); swap in your real model and optimizer and the data side
stays as it is.

    cachebuild latents examples/dataset --vae examples/tiny-vae --out /tmp/cache \
        --resolution 128 --min-bucket-reso 64 --max-bucket-reso 256
    python examples/train_tiny.py /tmp/cache --steps 20
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch.utils.data import DataLoader

from cachebuild import open_cache


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cache", help="a cache folder built by `cachebuild latents`")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def tiny_unet(channels: int) -> UNet2DModel:
    """A ~100k-parameter UNet: enough to show the loop, small enough for a CPU."""
    return UNet2DModel(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # also seeds the DataLoader's per-worker seeds
    cache = open_cache(args.cache)
    dataset = cache.dataset(scale=True)  # raw -> scaled: (z - shift) * scale, what the model trains on
    sampler = cache.bucket_sampler(batch_size=args.batch_size, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, persistent_workers=args.workers > 0)

    unet = tiny_unet(cache.fingerprint["vae"]["latent_channels"]).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    print(f"{len(cache)} items, {len(sampler)} batches per epoch", flush=True)

    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
        for batch in loader:
            z = batch["latents"]  # (B, C, H/f, W/f): one bucket per batch, so no padding or cropping
            if "latents_flipped" in batch:  # --flip-aug caches: pick the mirrored latents half the time
                use = torch.rand(z.shape[0]) < 0.5
                z = torch.where(use[:, None, None, None], batch["latents_flipped"], z)
            # SDXL-style models would also take batch["original_size"], batch["crop"] and batch["bucket"], each (B, 2)
            noise = torch.randn_like(z)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],))
            loss = F.mse_loss(unet(scheduler.add_noise(z, noise, t), t).sample, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            w, h = batch["bucket"][0].tolist()
            print(f"step {step} epoch {epoch} bucket {w}x{h} batch {z.shape[0]} loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
