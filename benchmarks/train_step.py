"""Training step time: SpaText vs the same UNet without ST channels, side by side in one run.

What is timed, per step (interleaved steps, alternating which variant goes first, after warm-up), for one batch held
in memory:
  plain    the UNet with its base ``conv_in`` (4 latent channels in): text-dropout, noise, forward, MSE, backward,
           AdamW step — ``spatext.model.train_step.denoising_loss`` with ``st=None``;
  spatext  the *same* UNet body with the SpaText ``conv_in`` (4 + D channels in) swapped in, plus ST built on the
           device from the image-resolution label map and the K segment embeddings (``build_st``, downsampling with
           small-segment rescue), both conditions dropped independently (``drop_conditions``), the same loss step.
Both variants share every weight except ``conv_in`` (one module, two input convolutions), so the difference is
exactly what SpaText adds. Frozen encoders (VAE, text encoder) are identical in both and left out: latents and text
tokens are random tensors of the right shapes.

Default shape (CPU): the SD-1.x UNet layout at half width (blocks 160/320/640/640, 2 layers, cross-attention like
SD) on 32x32 latents, D=384 (ViT-S-32), so that D / first width = 2.4 as for SD-1.x with ViT-L/14 (768 / 320).
The headline is the median of the per-step *paired* ratios (SpaText step / the plain step next to it: machine drift
hits both halves of a pair alike), with a bootstrap 95% confidence interval of that median and the ratios'
interquartile range; the verdict against the goal (<= 1.05) is "meets" when the whole interval is at or below it,
"misses" when it is wholly above, else "not resolved" (run more ``--steps``). The ratio of the two medians is kept in
the JSON (``ratio_spatext_over_plain``) for older records. Prints a table, writes ``train_step.json``. The README's CPU
figures (1 torch thread, 2 cores)::

    python benchmarks/train_step.py --threads 1 --out bench_output/train_d384
    python benchmarks/train_step.py --threads 1 --embed-dim 768 --out bench_output/train_d768  # ViT-L/14's D
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from bench_record import write_record
from bench_stats import paired_ratio_summary
from spatext.model.config import DenoiserConfig
from spatext.model.denoiser import extend_conv_in
from spatext.model.guidance import drop_conditions
from spatext.model.st import build_st
from spatext.model.train_step import denoising_loss

SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
GOAL = 1.05  # SpaText / plain training-step time
STEPS = 20  # paired steps by default (a pair of the default shape: 16-20 s on 1 torch thread, shared 2-core machine)


def bench_config(widths: list[int], layers: int, latent: int, embed_dim: int, text_dim: int, clip_model: str,
                 heads: int = 8) -> DenoiserConfig:
    """A latent SpaText config with the SD-1.x block layout (first len(widths) of its down/up blocks)."""
    n = len(widths)
    return DenoiserConfig(
        name=f"bench-{'-'.join(map(str, widths))}", variant="latent", resolution=8 * latent, sample_size=latent,
        embed_dim=embed_dim, clip_model=clip_model, text_embed_dim=text_dim,
        scheduler_kwargs={"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                          "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
        unet={"block_out_channels": widths, "layers_per_block": layers, "down_block_types": SD_DOWN[:n - 1] +
              ["DownBlock2D"], "up_block_types": ["UpBlock2D"] + SD_UP[5 - n:], "attention_head_dim": heads,
              "cross_attention_dim": text_dim, "norm_num_groups": 32},
    )


def random_label_maps(batch: int, size: int, segments: int, generator: torch.Generator) -> torch.Tensor:
    """B x size x size maps with ``segments`` random rectangles (later on top), one of them small (~2% of the side)."""
    maps = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(1, segments + 1):
            side = int(torch.randint(size // 5, size // 2, (1,), generator=generator))
            side = max(2, size // 40) if k == segments else side
            y, x = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
            maps[b, y : y + side, x : x + side] = k
    return maps


class Bench:
    """One UNet body with two input convolutions (plain / SpaText), one AdamW, one batch; times a training step."""

    def __init__(self, config: DenoiserConfig, batch: int, image_size: int, segments: int, device: str,
                 dtype: torch.dtype | None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.device, self.autocast = torch.device(device), dtype
        with self.device:  # initialise on the device (an SD-sized UNet initialises slowly on a CPU)
            self.unet = UNet2DConditionModel(**config.unet_kwargs()).train()
        self.plain_conv = self.unet.conv_in
        self.st_conv = extend_conv_in(self.unet, config.embed_dim).conv_in  # extend_conv_in swaps it in
        self.unet.conv_in = self.plain_conv
        params = [*self.unet.parameters(), *self.st_conv.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.scheduler = DDPMScheduler.from_config(config.scheduler_config())  # ignores DDIM-only keys
        g = torch.Generator().manual_seed(seed)
        latent = config.sample_size
        self.clean = torch.randn(batch, config.sample_channels, latent, latent, generator=g).to(self.device)
        self.text = torch.randn(batch, 77, config.text_embed_dim, generator=g).to(self.device)
        self.null = torch.randn(1, 77, config.text_embed_dim, generator=g).to(self.device)
        self.label_map = random_label_maps(batch, image_size, segments, g).to(self.device)
        emb = torch.nn.functional.normalize(torch.randn(batch, segments, config.embed_dim, generator=g), dim=-1)
        self.embeddings = emb.to(self.device)
        self.size = (latent, latent)

    def step(self, spatext: bool, generator_seed: int) -> None:
        """One full training step of the plain or the SpaText variant."""
        cpu = torch.Generator().manual_seed(generator_seed)
        dev = torch.Generator(device=self.device).manual_seed(generator_seed)
        self.unet.conv_in = self.st_conv if spatext else self.plain_conv
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if spatext:
                st = build_st(self.label_map, self.embeddings, self.size)
                cond = drop_conditions(self.text, st, 0.1, 0.1, self.null, cpu)
                loss = denoising_loss(self.unet, self.scheduler, self.clean, cond.text, cond.st, None, dev)
            else:
                drop = (torch.rand(self.text.shape[0], generator=cpu) < 0.1).to(self.device)[:, None, None]
                text = torch.where(drop, self.null.expand_as(self.text), self.text)
                loss = denoising_loss(self.unet, self.scheduler, self.clean, text, None, None, dev)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        """Wait for the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, steps: int, warmup: int) -> dict[str, list[float]]:
        """Seconds per step of each variant; interleaved, alternating which goes first."""
        times: dict[str, list[float]] = {"plain": [], "spatext": []}
        for i in range(warmup + steps):
            order = ("plain", "spatext") if i % 2 == 0 else ("spatext", "plain")
            for name in order:
                self.sync()
                started = time.perf_counter()
                self.step(name == "spatext", i)
                self.sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - started)
        return times

    def flops(self) -> dict[str, int]:
        """FLOPs of one training step of each variant (forward + backward, torch's FLOP counter; no noise)."""
        from torch.utils.flop_counter import FlopCounterMode

        out = {}
        for name in ("plain", "spatext"):
            with FlopCounterMode(display=False) as counter:
                self.step(name == "spatext", 0)
            out[name] = counter.get_total_flops()
        return out


def summarize(times: dict[str, list[float]], batch: int, goal: float = GOAL) -> dict:
    """Medians and samples/s of each variant, and the headline: the median of the paired SpaText / plain step ratios
    with its bootstrap 95% CI, IQR and verdict against `goal` (the ratio of the medians is kept for older records)."""
    med = {name: statistics.median(values) for name, values in times.items()}
    paired = paired_ratio_summary(times["spatext"], times["plain"], goal)
    return {
        "median_s": med, "samples_per_s": {name: batch / value for name, value in med.items()},
        "headline": "paired_ratio_median", "paired_ratio_median": paired["median"],
        "paired_ratio_ci95": paired["ci95"], "paired_ratio_iqr": paired["iqr"], "paired_ratios": paired["ratios"],
        "goal": goal, "verdict": paired["verdict"], "ci_method": paired["ci_method"], "pairs": paired["pairs"],
        "ratio_spatext_over_plain": med["spatext"] / med["plain"], "times_s": times,
    }


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Flags of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="160,320,640,640", help="UNet block_out_channels (SD-1.x: 320,640,1280,1280)")
    p.add_argument("--layers", type=int, default=2, help="layers per block (SD-1.x: 2)")
    p.add_argument("--latent", type=int, default=32, help="latent side (SD-1.x at 512 px: 64)")
    p.add_argument("--embed-dim", type=int, default=384, help="D, the ST channels (ViT-S-32: 384; ViT-L/14: 768)")
    p.add_argument("--text-dim", type=int, default=384, help="text hidden size = cross-attention dim (SD-1.x: 768)")
    p.add_argument("--batch-size", type=int, default=2, help="samples per step")
    p.add_argument("--segments", type=int, default=3, help="segments per sample (K)")
    p.add_argument("--steps", type=int, default=STEPS,
                   help="measured steps per variant, interleaved in pairs (the CI narrows as their number grows)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default="bench_output", help="folder for train_step.json")
    args = p.parse_args(input_args)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error(f"--widths: comma-separated integers, got {args.widths!r}")
    if not 2 <= len(widths) <= 4 or min(widths) < 1:
        p.error(f"--widths: 2 to 4 positive block widths (SD-1.x: 320,640,1280,1280), got {args.widths!r}")
    if min(args.steps, args.layers, args.latent, args.embed_dim, args.text_dim, args.batch_size, args.segments) < 1:
        p.error("--steps, --layers, --latent, --embed-dim, --text-dim, --batch-size and --segments must be >= 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    return args


def print_table(result: dict) -> None:
    """The step times of each variant, then the headline ratio with its spread and verdict."""
    print("| variant | median step (s) | samples/s |")
    print("|---|---|---|")
    for name in ("plain", "spatext"):
        print(f"| {name} | {result['median_s'][name]:.3f} | {result['samples_per_s'][name]:.2f} |")
    low, high = result["paired_ratio_ci95"]
    q1, q3 = result["paired_ratio_iqr"]
    print(f"\n| SpaText / plain step time, median of {result['pairs']} paired steps | 95% CI (bootstrap) | IQR of the "
          "ratios | FLOPs ratio | goal | verdict |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['paired_ratio_median']:.3f} | {low:.3f}–{high:.3f} | {q1:.3f}–{q3:.3f} | "
          f"{result['flop_ratio']:.4f} | <= {result['goal']} | {result['verdict']} |")


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write JSON."""
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    config = bench_config(widths, args.layers, args.latent, args.embed_dim, args.text_dim, "n/a")
    bench = Bench(config, args.batch_size, 8 * args.latent, args.segments, args.device, None)
    params = sum(p.numel() for p in bench.unet.parameters())
    result = summarize(bench.time_steps(args.steps, args.warmup), args.batch_size)
    result["flops"] = bench.flops()
    result["flop_ratio"] = result["flops"]["spatext"] / result["flops"]["plain"]
    result.update(config=config.to_dict(), args=vars(args), unet_params=params, torch=torch.__version__,
                  threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count())
    write_record(args.out, "train_step.json", result)
    print(f"UNet {widths} x{args.layers} layers, {params / 1e6:.0f} M params, latents {args.latent}x{args.latent}, "
          f"D={args.embed_dim}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads")
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
