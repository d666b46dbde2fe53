"""A tiny, seeded, Stable-Diffusion-like base model in diffusers layout, for tests and the offline demo.

``write_tiny_base_model(path)`` writes ``model_index.json``, ``unet/``, ``vae/`` (AutoencoderKL), ``text_encoder/``
(transformers CLIPTextModel), ``tokenizer/`` (CLIPTokenizer from a small byte-level BPE ``vocab.json`` +
``merges.txt`` written here) and ``scheduler/``; ``diffusers.StableDiffusionPipeline.from_pretrained(path)`` loads it,
and so does ``--base-model path``. Its sizes follow a latent denoiser config (default ``latent-tiny``). The weights
are random: pretrained: none (random init). Random weights are never silent (DESIGN.md), so the folder also holds
``spatext_weights.json`` (``WEIGHTS_MARKER``: ``{"pretrained": "none (random init)", "seed", "config", "made_by"}``),
which ``read_weights_marker`` reads back (``spatext eval generate --base-model`` labels its images with it).
"""

from __future__ import annotations

import json
import logging
import os

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers import schedulers as diffusers_schedulers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from spatext.model.config import DenoiserConfig, get_config
from spatext.pipeline.clip import RANDOM_INIT_LABEL

logger = logging.getLogger(__name__)

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WEIGHTS_MARKER = "spatext_weights.json"  # says where the weights of a model folder come from (here: random init)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of bytes used by byte-level BPE (GPT-2 / CLIP ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE: every byte (also word-final), every lowercase letter pair merged, and the two specials."""
    symbols = _byte_symbols()
    merges = [(a, b + end) for a in LETTERS for b in LETTERS for end in ("", "</w>")]
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_files(directory: str) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` of the tiny BPE into ``directory``; return their paths."""
    os.makedirs(directory, exist_ok=True)
    vocab, merges = tiny_vocab()
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


def _vae(config: DenoiserConfig) -> AutoencoderKL:
    """A tiny AutoencoderKL whose downsampling factor maps ``config.resolution`` onto ``config.sample_size``."""
    factor = config.resolution // config.sample_size
    if factor & (factor - 1):
        raise ValueError(f"--config {config.name!r}: resolution / sample_size must be a power of 2, got {factor}")
    blocks = factor.bit_length()  # 2 ** (blocks - 1) == factor
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[32] * blocks,
        layers_per_block=1,
        latent_channels=config.sample_channels,
        norm_num_groups=32,
        sample_size=config.resolution,
    )


def _text_encoder(config: DenoiserConfig, vocab: dict[str, int]) -> CLIPTextModel:
    """A tiny CLIPTextModel with hidden size ``config.text_embed_dim``."""
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=config.text_embed_dim,
        intermediate_size=2 * config.text_embed_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(text_config)


def write_weights_marker(path: str, seed: int, config_name: str) -> str:
    """Write ``WEIGHTS_MARKER`` into the model folder ``path`` (random init, with its seed); return its path.

    diffusers' ``model_index.json`` has no place for provenance, and a random base model must not pass for a real
    one downstream (``spatext eval generate`` reads this file to label the generations' weights).
    """
    marker = os.path.join(path, WEIGHTS_MARKER)
    record = {"pretrained": RANDOM_INIT_LABEL, "seed": seed, "config": config_name,
              "made_by": "spatext tiny-base-model (spatext.model.tiny_base)"}
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    return marker


def read_weights_marker(path: str) -> dict | None:
    """The ``WEIGHTS_MARKER`` record of a model folder, or None when it has none (provenance not given).

    Raises ValueError naming the file when it is not a JSON object with a ``pretrained`` string.
    """
    marker = os.path.join(path, WEIGHTS_MARKER)
    if not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as handle:
            record = json.load(handle)
    except json.JSONDecodeError as e:
        raise ValueError(f"{marker}: not valid JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("pretrained"), str):
        raise ValueError(f"{marker}: expected a JSON object with a 'pretrained' string")
    return record


def write_tiny_base_model(path: str, seed: int = 0, config: str | DenoiserConfig = "latent-tiny") -> str:
    """Write the tiny base model (sizes from a latent ``config``) to ``path``; return ``path``."""
    config = get_config(config) if isinstance(config, str) else config
    if config.variant != "latent":
        raise ValueError(f"--config {config.name!r}: the base model follows a latent config, got {config.variant}")
    tokenizer_dir = os.path.join(path, "tokenizer")
    vocab_file, merges_file = write_tokenizer_files(tokenizer_dir)
    vocab, _ = tiny_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config.unet_kwargs())
        vae = _vae(config)
        text_encoder = _text_encoder(config, vocab)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_LENGTH),
        unet=unet,
        scheduler=getattr(diffusers_schedulers, config.scheduler)(**config.scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    write_weights_marker(path, seed, config.name)
    logger.warning("tiny base model written to %s: pretrained: none (random init), seed %d", path, seed)
    return path


def main(argv: list[str] | None = None) -> int:
    """`spatext tiny-base-model DIR`: write the tiny offline base model (random weights) for demos and tests."""
    import argparse

    parser = argparse.ArgumentParser(prog="spatext tiny-base-model", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("out", help="folder to write the diffusers-layout model to")
    parser.add_argument("--seed", type=int, default=0, help="weights seed")
    parser.add_argument("--config", default="latent-tiny", help="latent config whose sizes the base model takes")
    args = parser.parse_args(argv)
    path = write_tiny_base_model(args.out, seed=args.seed, config=args.config)
    print(f"wrote a tiny Stable-Diffusion-like base model (random weights) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
