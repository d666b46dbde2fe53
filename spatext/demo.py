"""`make demo`: sample corpus -> build (offline) -> verify -> inspect grid, printing where everything is.

CLIP uses pretrained weights when they are available locally, random weights otherwise — and says which.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from spatext.pipeline import build, verify
from spatext.pipeline.clip import ClipSpec, load_clip
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.inspect_shards import inspect_build

logger = logging.getLogger("spatext.demo")


def pick_clip_pretrained(model: str, wanted: str) -> str:
    """`wanted` if its weights load here (offline), else 'none' (random init)."""
    if wanted == "none":
        return wanted
    try:
        load_clip(ClipSpec(model=model, pretrained=wanted))
    except (OSError, RuntimeError, ValueError) as exc:
        logger.warning("CLIP %s/%s weights are not available offline (%s): using random init", model, wanted, exc)
        return "none"
    return wanted


def rejects_line(output: str, counts: dict) -> str:
    """The summary's rejects line: the folder when the build wrote one (only rejected inputs create it)."""
    if counts.get("rejected"):
        return f"  rejects  {os.path.join(output, 'rejects')}"
    return "  rejects  none (every input was accepted, so no rejects/ folder)"


DEMO_CLIP = "ViT-B-32"  # the demo shards' CLIP: the latent-demo and pixel-demo configs take its embeddings


def main(argv: list[str] | None = None) -> int:
    """Run the demo end to end."""
    parser = argparse.ArgumentParser(prog="spatext demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="folder for the corpus, the build and the pictures")
    parser.add_argument("--num-samples", type=int, default=64, help="corpus size")
    parser.add_argument("--seed", type=int, default=0, help="corpus and selection seed")
    parser.add_argument("--clip-model", default=DEMO_CLIP, help="open_clip model for the demo")
    parser.add_argument("--clip-pretrained", default="openai", help="tag to use if available offline, else random")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    corpus, output = os.path.join(args.out, "corpus"), os.path.join(args.out, "build")
    grid = os.path.join(args.out, "inspect.png")

    write_corpus(corpus, args.num_samples, args.seed, "webdataset")
    pretrained = pick_clip_pretrained(args.clip_model, args.clip_pretrained)
    manifest = build.run([
        "--input", os.path.join(corpus, "shard-*.tar"), "--output", output, "--overwrite",
        "--segmenter", "annotations", "--clip-model", args.clip_model, "--clip-pretrained", pretrained,
        "--seed", str(args.seed),
    ])
    report = verify.verify_build(output, progress=False)
    inspect_build(output, grid, num=16)

    counts = manifest["counts"] if manifest else {}
    label = "none (random init)" if pretrained == "none" else pretrained
    print("\n".join([
        "",
        f"spatext demo finished in {time.time() - start:.0f} s",
        f"  corpus   {corpus}  ({args.num_samples} samples, webdataset tars with panoptic ground truth)",
        f"  shards   {os.path.join(output, 'shards')}  (accepted {counts.get('accepted')}, "
        f"rejected {counts.get('rejected')} {counts.get('rejected_by_reason')})",
        rejects_line(output, counts),
        f"  manifest {os.path.join(output, 'manifest.json')}",
        f"  verify   {report.format().splitlines()[0]}",
        f"  picture  {grid}",
        f"  CLIP     {args.clip_model}, pretrained: {label}",
    ]))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
