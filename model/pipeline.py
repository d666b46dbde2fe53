"""``SpaTextPipeline``: text + scene → image with a SpaText denoiser (a diffusers ``DiffusionPipeline``).

Components (all round-trip through ``save_pretrained`` / ``from_pretrained``):
``unet`` (the SpaText UNet: sample + D ST channels in), ``scheduler``, ``text_encoder`` + ``tokenizer`` (the base
model's CLIPTextModel for the global prompt), ``local_encoder`` (``LocalPromptEncoder``: open_clip's text tower for
the local prompts), ``prior`` (``PriorModel``: CLIP text embedding → CLIP image embedding) and ``vae`` (latent variant
only; the pixel variant has none). The two custom components are diffusers ``ModelMixin`` + ``ConfigMixin`` classes
defined here; ``model_index.json`` names them by module path (``spatext.model.pipeline``), which diffusers resolves
from the already imported module (no ``trust_remote_code``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from open_clip.model import _build_text_tower
from transformers import CLIPTextModel, CLIPTokenizer

from spatext.model.config import DenoiserConfig, get_config
from spatext.model.denoiser import build_denoiser, build_scheduler, cached_st, uses_image_embedding
from spatext.model.guidance import (
    Conditions,
    batch_passes,
    guidance_plan,
    guided_prediction_from_batch,
    null_conditions,
)
from spatext.model.prior import Prior, load_prior, prior_config_from_dict
from spatext.model.scene import Scene, check_regions_visible, rasterise
from spatext.model.st import build_st, downsample_label_map
from spatext.pipeline.clip import RANDOM_INIT_LABEL, ClipModel, prompt_list

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE_SCALE = 7.5  # joint guidance when no scale is given (diffusers' SD default)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class LocalPromptEncoder(ModelMixin, ConfigMixin):
    """CLIP's text tower (open_clip) for the local prompts: prompts → L2-normalised text embeddings (N x D)."""

    @register_to_config
    def __init__(self, clip_model: str = "ViT-L-14", quick_gelu: bool = False, pretrained: str = RANDOM_INIT_LABEL):
        """Build the text tower of ``clip_model`` (weights come from ``from_pretrained`` or ``from_clip``)."""
        super().__init__()
        config = open_clip.get_model_config(clip_model)
        if config is None:
            raise ValueError(f"--clip-model {clip_model!r} is not an open_clip architecture")
        self.text = _build_text_tower(config["embed_dim"], config["text_cfg"], quick_gelu=quick_gelu)
        self.embed_dim = int(config["embed_dim"])
        self._tokenizer = None

    @classmethod
    def from_clip(cls, clip: ClipModel) -> LocalPromptEncoder:
        """Copy the text tower of a loaded CLIP (``spatext.pipeline.clip.load_clip``)."""
        quick_gelu = any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.model.modules())
        encoder = cls(clip_model=clip.spec.model, quick_gelu=quick_gelu, pretrained=clip.pretrained_label)
        source = clip.model.state_dict()
        state = {}
        for key in encoder.text.state_dict():
            value = source.get(key, source.get(f"text.{key}"))
            if value is None:
                raise ValueError(f"--clip-model {clip.spec.model!r}: the CLIP has no text-tower weight {key!r}")
            state[key] = value
        encoder.text.load_state_dict(state, strict=True)
        return encoder.to(clip.spec.device).eval()

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """open_clip's tokenizer of this CLIP (token ids, N x context length; one string: N = 1)."""
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.config.clip_model)
        return self._tokenizer(prompt_list(prompts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids → L2-normalised text embeddings."""
        return F.normalize(self.text(tokens).float(), dim=-1)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts → L2-normalised text embeddings on this module's device (N x D; one string: N = 1); prompts longer
        than CLIP's context are cut, with a warning (as diffusers warns for the global prompt)."""
        prompts = prompt_list(prompts)
        if not prompts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        tokens = self.tokenize(prompts)
        encode = getattr(self._tokenizer, "encode", None)  # open_clip's SimpleTokenizer: BPE ids without SOT/EOT
        if encode is not None:
            long = [p for p in prompts if len(encode(p)) + 2 > tokens.shape[1]]
            if long:
                logger.warning("%d local prompt(s) are longer than CLIP's %d tokens and were cut, e.g. %r",
                               len(long), tokens.shape[1], long[0][:120])
        return self(tokens.to(self.device))


class PriorModel(ModelMixin, ConfigMixin):
    """The prior P as a pipeline component: CLIP text embeddings → L2-normalised CLIP image embeddings (N x D).

    Holds a ``spatext.model.prior.Prior`` built from ``prior_config`` (a ``PriorConfig`` as a dict, embed_dim set).
    An untrained prior is the identity (the no-prior ablation).
    """

    @register_to_config
    def __init__(self, prior_config: dict[str, Any]):
        """Build the prior network (weights come from ``from_pretrained``, ``from_prior`` or ``from_file``)."""
        super().__init__()
        data = {k: v for k, v in prior_config.items() if k != "name"}
        self.prior = Prior(prior_config_from_dict(data, name=prior_config.get("name", "custom")))
        self.embed_dim = int(self.prior.config.embed_dim)

    @classmethod
    def from_prior(cls, prior: Prior) -> PriorModel:
        """Wrap a ``Prior`` (e.g. from ``train_prior`` or ``load_prior``), copying its weights."""
        model = cls(prior_config=prior.config.to_dict())
        model.prior.load_state_dict(prior.state_dict(), strict=True)
        return model.to(next(prior.parameters()).device).eval()

    @classmethod
    def from_file(cls, output_or_file: str, device: str = "cpu") -> PriorModel:
        """Load a trained prior (a ``train_prior`` output dir or its .safetensors file) as a component."""
        return cls.from_prior(load_prior(output_or_file, device=device))

    def forward(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings (N x D) → image embeddings (N x D), L2-normalised."""
        return self.prior(text_embeddings.to(self.prior.proj_in.weight.dtype))


@dataclass
class SpaTextPipelineOutput(BaseOutput):
    """The images: a list of PIL images, or an array / tensor (N x H x W x 3 / N x 3 x H x W) per ``output_type``."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class SpaTextPipeline(DiffusionPipeline):
    """Text-to-image with a global prompt and a scene of (mask, local prompt) regions (SpaText)."""

    model_cpu_offload_seq = "text_encoder->local_encoder->prior->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        local_encoder: LocalPromptEncoder,
        prior: PriorModel,
        vae: AutoencoderKL | None = None,
    ):
        """Register the components and check that their sizes fit together."""
        super().__init__()
        _check_components(unet, text_encoder, local_encoder, prior, vae)
        self.register_modules(
            unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
            local_encoder=local_encoder, prior=prior, vae=vae,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def default_size(self) -> tuple[int, int]:
        """The image size (height, width) the denoiser was built for: its sample size times the VAE factor."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return size[0] * self.vae_scale_factor, size[1] * self.vae_scale_factor

    @property
    def sample_channels(self) -> int:
        """Channels of the denoised sample (latent channels, or 3 for the pixel variant)."""
        return self.unet.config.out_channels

    def check_inputs(
        self, prompt: Any, scene: Any, height: int, width: int, num_inference_steps: int, output_type: str,
        num_images_per_prompt: int,
    ) -> tuple[list[str], list[Scene]]:
        """Validate the call's arguments; return the prompts and one scene per prompt."""
        scenes = _as_scenes(scene)
        if prompt is None:
            prompts = [s.prompt for s in scenes]
            if not all(p.strip() for p in prompts):
                raise ValueError("prompt: give a prompt, or scenes that carry one")
        elif isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if not prompts:
            raise ValueError("prompt: the list is empty")
        if len(scenes) == 1 and len(prompts) > 1:
            scenes = scenes * len(prompts)
        if len(scenes) != len(prompts):
            raise ValueError(f"scene: got {len(scenes)} scenes for {len(prompts)} prompts")
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < factor or value % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor}, got {value!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        return prompts, scenes

    def encode_prompt(self, prompts: str | Sequence[str], device: torch.device | None = None,
                      warn_truncation: bool = True) -> torch.Tensor:
        """Global prompts → the base text encoder's last hidden states (N x L x C; one string: N = 1). Prompts over
        the tokenizer's length are cut, with a warning naming the cut part (as diffusers' SD pipelines do) unless
        ``warn_truncation`` is False (training, which cuts silently like diffusers' training scripts)."""
        device = device or self._execution_device
        prompts = prompt_list(prompts)
        limit = self.tokenizer.model_max_length
        tokens = self.tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        for ids in self.tokenizer(prompts).input_ids if warn_truncation else ():  # untruncated
            if len(ids) > limit:
                logger.warning("The following part of your input was truncated because CLIP can only handle "
                               "sequences up to %d tokens: %r", limit, self.tokenizer.decode(ids[limit - 1 : -1]))
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def embed_prompts(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Prompts → CLIP text embeddings → prior → CLIP image embeddings (N x D, L2-normalised)."""
        return self.prior(self.local_encoder.encode(prompts))

    def segment_embeddings(self, scenes: Sequence[Scene], device: torch.device) -> torch.Tensor:
        """The prior's image embeddings of every scene's local prompts, zero-padded to B x K x D (K >= 1)."""
        flat = [p for s in scenes for p in s.prompts]
        embedded = self.embed_prompts(flat).to(device) if flat else None
        table = torch.zeros(len(scenes), max([1, *(len(s.regions) for s in scenes)]), self.prior.embed_dim)
        table = table.to(device)
        start = 0
        for i, s in enumerate(scenes):
            count = len(s.regions)
            if count:
                table[i, :count] = embedded[start : start + count]
            start += count
        return table

    def prepare_st(
        self, scenes: Sequence[Scene], embeddings: torch.Tensor, image_size: tuple[int, int], device: torch.device
    ) -> torch.Tensor:
        """Rasterise the scenes at the image size, reduce the maps to the denoiser's size, and build ST (B x D x h x w).

        Raises ValueError when a region has no pixel at the denoiser's resolution.
        """
        size = (image_size[0] // self.vae_scale_factor, image_size[1] // self.vae_scale_factor)
        maps = torch.from_numpy(np.stack([rasterise(s, image_size) for s in scenes])).to(device)
        small = downsample_label_map(maps, size, num_segments=embeddings.shape[1])
        for i, s in enumerate(scenes):
            check_regions_visible(small[i], s, f"the model's resolution {size[0]}x{size[1]} (scene {i})")
        return build_st(small, embeddings)

    def visible_regions(self, scene: Scene, image_size: tuple[int, int]) -> list[bool]:
        """Per region of ``scene``, whether it keeps a pixel at the image size and then at the denoiser's resolution
        (what ``prepare_st`` checks; the eval drops the others from a benchmark scene instead of failing, and records
        them)."""
        size = (image_size[0] // self.vae_scale_factor, image_size[1] // self.vae_scale_factor)
        label_map = torch.from_numpy(rasterise(scene, image_size, check=False))[None]
        small = downsample_label_map(label_map, size, num_segments=max(1, len(scene.regions)))
        present = set(small.unique().tolist())
        return [i in present for i in range(1, len(scene.regions) + 1)]

    def prepare_latents(
        self, batch: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device, generator: Any,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """Initial noise (B x C x h x w) scaled by the scheduler, or the given ``latents``."""
        shape = (batch, self.sample_channels, size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: got {len(generator)} generators for {batch} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    @contextlib.contextmanager
    def prepare_denoiser(self, st: torch.Tensor) -> Iterator[Callable[..., torch.Tensor]]:
        """For one denoising loop: ``denoise(sample, t, text, image)`` → the UNet's prediction with ST ``st``.

        ``st`` has the rows of every batched forward of the loop. ``conv_in`` is linear, so its ST term is computed
        once here (``cached_st``) instead of at every step; ``unet.conv_in`` is restored when the block ends.
        """
        with cached_st(self.unet, st) as denoise:
            yield denoise

    def decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Denoised samples → images of ``output_type`` (the VAE decodes latents; pixel samples are images)."""
        if output_type == "latent":
            return latents
        image = latents
        if self.vae is not None:  # in the VAE's dtype, which may differ from the UNet's (see ``__call__``)
            latents = latents.to(self.vae.dtype)
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    def _step_kwargs(self, generator: Any, eta: float = 0.0) -> dict[str, Any]:
        """Pass ``generator`` and ``eta`` to ``scheduler.step`` when it takes them (as diffusers' extra step kwargs)."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"generator": generator} if "generator" in accepted else {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        scene: Scene | Sequence[Any] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        text_guidance_scale: float | None = None,
        st_guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> SpaTextPipelineOutput | tuple:
        """Generate images for global ``prompt``(s) laid out by ``scene``(s).

        ``scene`` is a ``Scene``, a list of (mask, local prompt) pairs, or a list of ``Scene`` (one per prompt);
        masks are H x W (resized to the image size if needed); later regions lie on top. None: no regions (the
        global prompt alone, ST all zeros). ``prompt`` may be None when
        the scenes carry prompts; when given it wins over theirs. ``guidance_scale`` alone uses the two-pass joint
        guidance (default ``DEFAULT_GUIDANCE_SCALE``); ``text_guidance_scale`` + ``st_guidance_scale`` use one scale
        per condition (three passes); giving both forms is an error. ``negative_prompt`` (one, or one per prompt)
        replaces the empty prompt as the text of every pass without the global prompt (the unconditional one, and the
        ST-only pass of per-condition guidance), as in diffusers.

        ``eta`` is DDIM's η (0: deterministic; passed to schedulers whose ``step`` takes it, as in diffusers).
        ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`` runs after each step with the tensors
        named in ``callback_on_step_end_tensor_inputs`` (``latents``); a tensor it returns in its dict replaces the
        pipeline's (diffusers' convention). ``prompt_embeds`` (N x L x C, ``encode_prompt``'s output) stands for
        ``prompt`` and ``negative_prompt_embeds`` for ``negative_prompt`` (latent variant: the pixel variant needs the
        prompt's text for its CLIP image embedding).

        Components may have different dtypes (e.g. a bf16 text encoder and VAE beside an fp32 UNet, as a
        mixed-precision training run holds them): everything the UNet takes is cast to the UNet's dtype, the latents
        to the VAE's before decoding.
        """
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        # 1. Check inputs
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - {"latents"})
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: only 'latents' is passed, got {unknown}")
        embeds = _check_embeds(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                               self.text_encoder.config.hidden_size, uses_image_embedding(self.unet))
        prompts, scenes = self.check_inputs(
            [""] * embeds if embeds else prompt, scene, height, width, num_inference_steps, output_type,
            num_images_per_prompt,
        )
        if guidance_scale is not None and (text_guidance_scale is not None or st_guidance_scale is not None):
            raise ValueError("guidance_scale is the joint form, text_guidance_scale + st_guidance_scale the "
                             "per-condition form: give one form, not both")
        if guidance_scale is None and text_guidance_scale is None and st_guidance_scale is None:
            guidance_scale = DEFAULT_GUIDANCE_SCALE
        plan = guidance_plan(guidance_scale, text_guidance_scale, st_guidance_scale)
        negatives = _negative_prompts(negative_prompt, len(prompts))
        device, n, dtype = self._execution_device, num_images_per_prompt, self.unet.dtype
        batch = len(prompts) * n
        # 2. Encode the global prompt (and, for the pixel variant, its CLIP image embedding through the prior)
        text = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompts, device)
        text = text.to(device, dtype).repeat_interleave(n, dim=0)
        null_text = (negative_prompt_embeds if negative_prompt_embeds is not None
                     else self.encode_prompt(negatives, device)).to(device, dtype)
        if negative_prompt is not None or negative_prompt_embeds is not None:  # one per image, like the prompts
            null_text = null_text.expand(len(prompts), -1, -1).repeat_interleave(n, dim=0)
        image = None
        if uses_image_embedding(self.unet):
            image = self.embed_prompts(prompts).to(device, dtype).repeat_interleave(n, dim=0)
        # 3. Encode the local prompts: CLIP text → prior → segment embeddings (B x K x D)
        embeddings = self.segment_embeddings(scenes, device)
        # 4. Rasterise the scenes and build ST at the denoiser's resolution
        st = self.prepare_st(scenes, embeddings, (height, width), device).to(dtype).repeat_interleave(n, dim=0)
        # ... and the conditions of every guidance pass, batched once: rows [uncond, cond, ...], the same every step
        cond = Conditions(text, st, image)
        passes = batch_passes(cond, null_conditions(cond, null_text), plan.passes)
        # 5. Prepare timesteps and latents
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, (height, width), dtype, device, generator, latents)
        # 6. Denoising loop with classifier-free guidance (all passes in one forward; ST's conv_in term computed once)
        step_kwargs = self._step_kwargs(generator, eta)
        timesteps = self.scheduler.timesteps
        with self.prepare_denoiser(passes.st) as denoise, self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                sample = self.scheduler.scale_model_input(latents, t)
                noise = guided_prediction_from_batch(
                    lambda x, c, t=t: denoise(x, t, c.text, c.image), sample, passes, plan
                )
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                    latents = outputs.get("latents", latents)
                progress.update()
        # 7. Decode
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        # 8. Return the output
        if not return_dict:
            return (images,)
        return SpaTextPipelineOutput(images=images)


def saved_pipeline_class(folder: str) -> str | None:
    """The class a saved diffusers pipeline folder names (model_index.json's ``_class_name``); None without one."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as handle:
        return json.load(handle).get("_class_name")


def _check_embeds(prompt: Any, prompt_embeds: Any, negative_prompt: Any, negative_embeds: Any, width: int,
                  pixel: bool) -> int:
    """ValueError for prompt embeddings that cannot be used (diffusers' rules: text or embeddings, not both; N x L x
    C tensors of the text encoder's width; negatives shaped like the prompts'); their count N, or 0 without them."""
    if negative_embeds is not None and negative_prompt is not None:
        raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
    if prompt_embeds is None:
        if negative_embeds is not None:
            raise ValueError("negative_prompt_embeds goes with prompt_embeds")
        return 0
    if prompt is not None:
        raise ValueError("give prompt or prompt_embeds, not both")
    if pixel:
        raise ValueError("prompt_embeds: the pixel variant needs the prompt's text (its CLIP image embedding comes "
                         "from the prior); pass prompt")
    for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_embeds)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[2] != width):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be N x L x {width} (encode_prompt's output), got {got}")
    if negative_embeds is not None and negative_embeds.shape != prompt_embeds.shape:
        raise ValueError(f"negative_prompt_embeds {tuple(negative_embeds.shape)} must have prompt_embeds' shape "
                         f"{tuple(prompt_embeds.shape)}")
    return prompt_embeds.shape[0]


def _negative_prompts(negative_prompt: Any, count: int) -> list[str]:
    """The texts of the null condition: [""] (the empty prompt of DESIGN.md) or the negative prompt(s), one or one
    per prompt."""
    if negative_prompt is None:
        return [""]
    if isinstance(negative_prompt, str):
        return [negative_prompt]
    if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
        raise ValueError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
    if len(negative_prompt) != count:
        raise ValueError(f"negative_prompt: got {len(negative_prompt)} for {count} prompts")
    return list(negative_prompt)


def _as_scenes(scene: Any) -> list[Scene]:
    """A ``Scene``, a list of (mask, prompt) pairs, or a list of ``Scene``s → a list of ``Scene``s; None → one
    scene without regions (ST all zeros: the global prompt alone, as in the ST-dropout training samples)."""
    if scene is None:
        return [Scene("", [])]
    if isinstance(scene, Scene):
        return [scene]
    if isinstance(scene, (list, tuple)):
        if scene and all(isinstance(s, Scene) for s in scene):
            return list(scene)
        try:
            return [Scene("", list(scene))]
        except ValueError as e:
            raise ValueError(f"scene: {e}") from e
    raise ValueError(f"scene must be a Scene, a list of (mask, prompt) pairs or a list of Scenes, got {scene!r:.80}")


def _check_components(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    local_encoder: LocalPromptEncoder,
    prior: PriorModel,
    vae: AutoencoderKL | None,
) -> None:
    """Raise ValueError naming the component whose size does not fit the others."""
    dim = local_encoder.embed_dim
    if vae is None and not uses_image_embedding(unet):
        raise ValueError("vae: a latent denoiser needs a VAE (only the pixel variant has none)")
    if prior.embed_dim != dim:
        raise ValueError(f"prior: embed_dim {prior.embed_dim} != local_encoder's CLIP embed_dim {dim}")
    sample_channels = vae.config.latent_channels if vae is not None else 3
    if unet.config.in_channels != sample_channels + dim or unet.config.out_channels != sample_channels:
        raise ValueError(
            f"unet: takes {unet.config.in_channels} channels in / {unet.config.out_channels} out; expected "
            f"{sample_channels} + {dim} (ST) in and {sample_channels} out"
        )
    hidden = text_encoder.config.hidden_size
    expected = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    if hidden != expected:
        raise ValueError(f"text_encoder: hidden size {hidden} != the unet's text input size {expected}")


def build_pipeline(
    config: DenoiserConfig | str, base_model: str, local_encoder: LocalPromptEncoder, prior: PriorModel, seed: int = 0
) -> SpaTextPipeline:
    """An untrained SpaText pipeline: ``config``'s denoiser, ``base_model``'s text encoder, tokenizer, scheduler, VAE.

    The latent denoiser starts from ``base_model``'s UNet (new ST weights at zero); the pixel one is random, and
    takes no VAE. ``local_encoder`` and ``prior`` are used as given.
    """
    config = get_config(config) if isinstance(config, str) else config
    if local_encoder.embed_dim != config.embed_dim:
        raise ValueError(
            f"--clip-model {local_encoder.config.clip_model!r}: embed_dim {local_encoder.embed_dim} != "
            f"{config.embed_dim} of --config {config.name!r}"
        )
    latent = config.variant == "latent"
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae") if latent else None
    return SpaTextPipeline(
        unet=build_denoiser(config, base_model if latent else None, seed=seed),
        scheduler=build_scheduler(config, base_model),
        text_encoder=CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer"),
        local_encoder=local_encoder,
        prior=prior,
        vae=vae,
    )
