"""The sample-processing side of a run, built from its config alone: tokenizer, image processor and the
SampleProcessor the loader runs, without building the model or a DeepSpeed engine.

`pretrain shards verify` and the benchmarks use it so they run exactly the training path; it makes the same objects
as `pretrain.train.engine.build_engine` (image tokens per image and the image token id come from the same Llava
config the model is built from). It lives with the model, as a Hugging Face model's processor does, because it reads
the model's Llava config; the data layer below it takes the numbers (image tokens, token ids) as arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, LlavaConfig, PreTrainedTokenizerBase

from pretrain.config import Config, ModelConfig
from pretrain.data.anyres import (
    AnyResTransform,
    TokenCounter,
    anyres_image_processor,
    grid_pinpoints,
    is_anyres_processor,
    llava_next_processor,
    tile_processor,
)
from pretrain.data.chat_formats import apply_chat_format
from pretrain.data.image import ImageTransform, image_processor_for_vision_config
from pretrain.data.sample import SampleProcessor, VideoSampling
from pretrain.data.text import TextProcessor
from pretrain.data.video import FrameTransform
from pretrain.model.build import build_llava_config, load_tokenizer
from pretrain.model.components import load_component_config
from pretrain.model.video import tokens_per_frame
from pretrain.tokens import IMAGE_TOKEN

log = logging.getLogger(__name__)


@dataclass
class DataProcessing:
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    processor: SampleProcessor
    vlm_config: LlavaConfig

    @property
    def image_token_id(self) -> int:
        return self.vlm_config.image_token_id

    @property
    def image_tokens(self) -> int:
        """Decoder positions one image takes."""
        return self.vlm_config.image_seq_length


def image_processor_for(mcfg: ModelConfig) -> Any:
    """The vision tower's own image processor (from its directory or the exported model), else one built from the
    tower's config with the standard CLIP / SigLIP settings.
    With model.image_tiling=anyres: a LlavaNextImageProcessor with the tower processor's settings (an anyres
    export's own one as it is)."""
    source = mcfg.init_from or (mcfg.vision if isinstance(mcfg.vision, str) else None)
    processor = None
    if source:
        try:
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            log.warning("no image processor in %s (%s); using one built from the vision config", source, err)
    if processor is None:
        processor = image_processor_for_vision_config(load_component_config(mcfg.vision, vision=True))
    if mcfg.image_tiling != "anyres" or is_anyres_processor(processor):
        return processor
    tile = _tower_config(mcfg).image_size
    return anyres_image_processor(processor, grid_pinpoints(mcfg.image_grid_pinpoints, tile, mcfg.max_image_tiles),
                                  tile)


def _tower_config(mcfg: ModelConfig) -> Any:
    if mcfg.init_from:
        return AutoConfig.from_pretrained(mcfg.init_from).vision_config
    return load_component_config(mcfg.vision, vision=True)


def vlm_config_for(mcfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """The Llava config the model will have (no weights are loaded)."""
    if mcfg.init_from:
        cfg = AutoConfig.from_pretrained(mcfg.init_from)
        cfg.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)  # as build_model sets it after loading
        return cfg
    return build_llava_config(mcfg, tokenizer)


def sample_processor(cfg: Config, tokenizer: PreTrainedTokenizerBase, vlm_config: LlavaConfig,
                     image_processor: Any) -> SampleProcessor:
    """Raw sample -> ProcessedSample, the training path: text with the image tokens expanded, pixels as the tower's
    processor makes them (or the fast path with `data.fast_image_decode`)."""
    video = video_sampling(cfg, image_processor, vlm_config)
    text = TextProcessor(tokenizer, vlm_config.image_token_id, vlm_config.image_seq_length, cfg.data.max_length,
                         getattr(vlm_config, "video_token_id", None) if video else None)
    max_tiles = cfg.model.max_image_tiles
    if is_anyres_processor(image_processor):
        # No draft decoding: the grid and the token count follow the image's full size.
        count = TokenCounter(llava_next_processor(image_processor, tokenizer, vlm_config))
        return SampleProcessor(text, AnyResTransform(image_processor), cfg.data.max_image_pixels,
                               image_token_count=count, max_image_tiles=max_tiles, video=video)
    transform = ImageTransform.from_processor(image_processor, fast=cfg.data.fast_image_decode)
    return SampleProcessor(text, transform, cfg.data.max_image_pixels, draft_size=transform.draft_size,
                           max_image_tiles=max_tiles)


def video_sampling(cfg: Config, image_processor: Any, vlm_config: Any) -> VideoSampling | None:
    """How the run's clips become frames and tokens (None: it takes no video, data.video_frames 0)."""
    if not cfg.data.video_frames or not hasattr(vlm_config, "video_token_id"):
        return None
    return VideoSampling(cfg.data.video_frames, cfg.data.video_fps, FrameTransform(tile_processor(image_processor)),
                         tokens_per_frame(vlm_config.vision_config))


def run_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer (image and pad tokens added, and the video token in a video run) with the run's
    conversation format."""
    return apply_chat_format(load_tokenizer(cfg.model, video=cfg.data.video_frames > 0), cfg.data.chat_template)


def build_processing(cfg: Config, tokenizer: PreTrainedTokenizerBase | None = None,
                     vlm_config: LlavaConfig | None = None) -> DataProcessing:
    """Everything between shard bytes and a batch for this config; `tokenizer` defaults to `run_tokenizer`,
    `vlm_config` (a built model's) to the config the model will have."""
    tokenizer = tokenizer or run_tokenizer(cfg)
    vlm_config = vlm_config or vlm_config_for(cfg.model, tokenizer)
    image_processor = image_processor_for(cfg.model)
    processor = sample_processor(cfg, tokenizer, vlm_config, image_processor)
    return DataProcessing(tokenizer, image_processor, processor, vlm_config)
