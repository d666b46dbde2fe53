"""`spatext inspect DIR --out grid.png`: a picture of N samples with their segments outlined and labelled."""

from __future__ import annotations

import argparse
import itertools
import logging
import textwrap
from collections.abc import Iterator

import numpy as np
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from spatext.pipeline.palette import region_colour
from spatext.pipeline.parquet_files import parquet_file
from spatext.pipeline.resize import resize_labels
from spatext.pipeline.schema import ShardSample, read_metadata, row_to_sample
from spatext.pipeline.write import list_parquet

logger = logging.getLogger(__name__)


def iter_samples(output: str) -> Iterator[tuple[ShardSample, dict[str, str]]]:
    """Decoded rows of a build, shard by shard, with each shard's metadata."""
    for path in list_parquet(output):
        parquet = parquet_file(path)
        meta = read_metadata(parquet.schema_arrow)
        for group in range(parquet.num_row_groups):
            for row in parquet.read_row_group(group).to_pylist():
                yield row_to_sample(row), meta


def render_sample(sample: ShardSample, tile: int = 320) -> Image.Image:
    """One tile: the image with each segment tinted, outlined and labelled, and the caption underneath."""
    image = Image.fromarray(sample.image)
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    overlay = image.resize(size, Image.Resampling.LANCZOS)
    segment_map = resize_labels(sample.segment_map, (size[1], size[0]))
    for seg in sample.segments:
        color = region_colour(seg["index"])
        mask = Image.fromarray(((segment_map == seg["index"]) * 255).astype(np.uint8))
        overlay = Image.composite(Image.blend(overlay, Image.new("RGB", size, color), 0.4), overlay, mask)
        edge = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(5))))  # 2-px outline
        overlay.paste(Image.new("RGB", size, color), mask=edge)
    canvas = Image.new("RGB", (tile, tile + 70), (255, 255, 255))
    canvas.paste(overlay, ((tile - overlay.width) // 2, (tile - overlay.height) // 2))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for seg in sample.segments:
        x0, y0, _, _ = seg["bbox"]
        xy = ((tile - overlay.width) // 2 + x0 * scale + 2, (tile - overlay.height) // 2 + y0 * scale + 2)
        text = f"{seg['index']}: {seg['label'] or 'segment'} ({seg['area']:.0%})"
        box = draw.textbbox(xy, text, font=font)
        draw.rectangle(box, fill=region_colour(seg["index"]))
        draw.text(xy, text, fill=(0, 0, 0), font=font)
    draw.text((4, tile + 2), caption_lines(sample.caption, tile // 6), fill=(0, 0, 0), font=font)
    return canvas


def caption_lines(caption: str, width: int, lines: int = 4) -> str:
    """A caption wrapped to `width` characters, at most `lines` lines; a cut caption ends with " ..." (so that a
    reader sees it goes on)."""
    return "\n".join(textwrap.wrap(caption, width=width, max_lines=lines, placeholder=" ..."))


def render_grid(samples: list[ShardSample], columns: int = 4, tile: int = 320, title: str = "") -> Image.Image:
    """Tiles in a grid, with a title line (which says when the embeddings come from random weights)."""
    if not samples:
        raise ValueError("no samples to draw")
    columns = max(1, min(columns, len(samples)))
    rows = -(-len(samples) // columns)
    header = 24 if title else 0
    grid = Image.new("RGB", (columns * tile, header + rows * (tile + 70)), (255, 255, 255))
    if title:
        ImageDraw.Draw(grid).text((6, 6), title, fill=(0, 0, 0), font=ImageFont.load_default())
    for i, sample in enumerate(samples):
        grid.paste(render_sample(sample, tile), ((i % columns) * tile, header + (i // columns) * (tile + 70)))
    return grid


MAX_TILE = 2048  # pixels per tile side; stored images are at most --image-size (512 by default)
MAX_GRID_SIDE = 16384  # pixels across the grid


def inspect_build(output: str, out: str, num: int = 16, columns: int = 4, tile: int = 320) -> str:
    """Draw the first `num` samples of a build into a PNG at `out`; returns `out`."""
    for flag, value, least in (("--num", num, 1), ("--columns", columns, 1), ("--tile", tile, 32)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if tile > MAX_TILE or columns * tile > MAX_GRID_SIDE:  # a grid of 100,000-px tiles exhausts memory
        raise ValueError(f"--tile must be <= {MAX_TILE} and --columns x --tile <= {MAX_GRID_SIDE}, got --tile {tile} "
                         f"and --columns {columns}")
    pairs = list(itertools.islice(iter_samples(output), num))
    if not pairs:
        raise ValueError(f"{output!r} holds no samples (no rows under shards/)")
    meta = pairs[0][1]
    title = (f"{output}: {len(pairs)} samples | segmenter {meta.get('segmenter')} "
             f"({meta.get('segmenter_weights')}) | CLIP {meta.get('clip_model')} ({meta.get('clip_pretrained')})")
    grid = render_grid([s for s, _ in pairs], columns, tile, title)
    with FileSystems.create(out) as handle:
        grid.save(handle, format="PNG")
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry."""
    parser = argparse.ArgumentParser(prog="spatext inspect", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="a build's output directory")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--num", type=int, default=16, help="samples to draw")
    parser.add_argument("--columns", type=int, default=4, help="tiles per row")
    parser.add_argument("--tile", type=int, default=320, help="tile size in pixels")
    args = parser.parse_args(argv)
    path = inspect_build(args.output, args.out, args.num, args.columns, args.tile)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
