"""LLaVA-NeXT / LLaVA-1.6 (llava-hf ``LlavaNextForConditionalGeneration``, transformers 5 layout).

Same layout as LLaVA (``model.model.{vision_tower, multi_modal_projector, language_model,
image_newline}``, ``model.lm_head``) and the same kind of processor: ``LlavaNextProcessor`` expands the
one ``<image>`` placeholder into the image's token run. What differs is anyres tiling: the number of
image tokens depends on each image's size (``image_sizes``: base view + the unpadded tiles of the best
grid in ``image_grid_pinpoints`` + one newline token per row), so rows of one batch carry different
numbers of image tokens. The LLaVA prompt/label/subject logic already counts image tokens per row, so
only the registration differs.

``vision_only_inputs``: ``pixel_values`` and ``image_sizes`` only feed the vision tower and the
tiling/unpadding of its features; the decoder's positions come from the attention mask alone, so both
may be dropped when the layers up to the edited one are replayed (checked by the adapter tests).
The tiling also means no fixed-size feature block per image: no ONNX export (``vision_export``).
"""
from __future__ import annotations

from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    config_classes = ("LlavaNextConfig",)
    model_classes = {"LlavaNextConfig": "LlavaNextForConditionalGeneration"}
    vision_only_inputs = ("pixel_values", "image_sizes")
    vision_export = None
