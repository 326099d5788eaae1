"""LLaVA (llava-hf ``LlavaForConditionalGeneration``, transformers 5 module layout).

Layout: ``model.model.{vision_tower, multi_modal_projector, language_model}`` and ``model.lm_head``;
decoder layers at ``model.model.language_model.layers``. ``save_pretrained`` writes the legacy
keys (``language_model.model.layers.N...``), which is what ``parameter_name`` returns. Its image
features (``get_image_features``: vision tower, then projector; one [N, D] block per image) are what
ONNX export takes (``vision_export``). Everything else is the shared HF base (``hf_chat.HFChatAdapter``).
"""
from __future__ import annotations

from .base import VisionExport
from .hf_chat import COMPONENTS, IGNORE_INDEX, HFChatAdapter, join_text, target_start

__all__ = ["COMPONENTS", "IGNORE_INDEX", "LlavaAdapter", "join_text", "target_start"]


class LlavaAdapter(HFChatAdapter):
    config_classes = ("LlavaConfig",)
    model_classes = {"LlavaConfig": "LlavaForConditionalGeneration"}
    vision_only_inputs = ("pixel_values",)
    prefix_cache = True
    vision_export = VisionExport(features="get_image_features", parts=("vision_tower", "multi_modal_projector"),
                                 feature_config=("vision_feature_layer", "vision_feature_select_strategy"),
                                 image_token_config=("image_token_id", "image_token_index"))
