"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``,
transformers 5 layout; both classes exist in transformers 5.17 and 5.24).

Layout: ``model.model.{visual, language_model}`` and ``model.lm_head``; decoder layers at
``model.model.language_model.layers`` with a LLaMA-style MLP (gate/up/down_proj). ``save_pretrained``
writes the legacy keys (``model.layers.N...``), which is what ``parameter_name`` returns (asked from
transformers itself, as for LLaVA).

Prompt: the chat template puts the image inline as ``<|vision_start|><|image_pad|><|vision_end|>``; the
processor expands ``<|image_pad|>`` into ``grid_t * grid_h * grid_w / merge_size**2`` tokens (dynamic
resolution: the count depends on the image size). The generation prompt ends with
"<|im_start|>assistant\\n", so answers are appended without a separating space (``join_text``).

Positions: M-RoPE position ids are computed inside the model from input_ids, ``mm_token_type_ids``
and ``image_grid_thw``, so ``vision_only_inputs`` is empty: no input is dropped on replay (the grid and
token types shape the positions of every later token). ``encode`` re-lays-out ``mm_token_type_ids``
with the rows it re-pads.

Processor: the stock ``Qwen2VLProcessor`` cannot be built without torchvision (its video processor
needs it, even for images only; transformers 5.17 and 5.24 alike). ``load_processor`` loads the stock
one where torchvision is installed and otherwise ``image_only_processor``: the same processor class
without the video part, from the folder's tokenizer, image processor (PIL backend without
torchvision) and chat template. It saves as a normal ``Qwen2VLProcessor`` folder. The torchvision
path is untested here (no torchvision build matching the CPU torch of the dev machine).
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import transformers
from transformers import AutoConfig

from .hf_chat import HFChatAdapter

# config class name -> processor class name in transformers
_PROCESSORS = {"Qwen2VLConfig": "Qwen2VLProcessor", "Qwen2_5_VLConfig": "Qwen2_5_VLProcessor"}


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


@functools.lru_cache(maxsize=None)
def _image_only_class(processor_class: str) -> type:
    base = getattr(transformers, processor_class)

    class ImageOnly(base):
        __doc__ = f"{processor_class} without its video processor (images only; no torchvision needed)."

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # the attributes (hence the sub-processors checked, saved and loaded) come from this signature
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self):
            out = super().to_dict()
            out["processor_class"] = processor_class  # the folder stays a stock one
            return out

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class}"
    return ImageOnly


def image_only_processor(image_processor, tokenizer, chat_template: str | None = None,
                         processor_class: str = "Qwen2VLProcessor"):
    """A ``processor_class`` (Qwen2VLProcessor / Qwen2_5_VLProcessor) for images and text only."""
    return _image_only_class(processor_class)(image_processor, tokenizer, chat_template=chat_template)


class Qwen2VLAdapter(HFChatAdapter):
    config_classes = ("Qwen2VLConfig", "Qwen2_5_VLConfig")
    model_classes = {"Qwen2VLConfig": "Qwen2VLForConditionalGeneration",
                     "Qwen2_5_VLConfig": "Qwen2_5_VLForConditionalGeneration"}
    vision_only_inputs = ()
    prefix_cache = False

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or "<|image_pad|>"

    def chat_prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return super().chat_prompt(text)
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|>{self.image_token}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")

    @classmethod
    def load_processor(cls, path, *, trust_remote_code: bool = False):
        """The stock processor where torchvision is installed; else (or if the folder has no video
        processor settings the stock class can load) the image-only variant of the same class."""
        if torchvision_available():
            try:
                return super().load_processor(path, trust_remote_code=trust_remote_code)
            except (OSError, ValueError, TypeError, ImportError, AttributeError, KeyError) as e:
                first = e
        else:
            first = None
        try:
            return _load_image_only(path, trust_remote_code)
        except Exception:
            if first is not None:
                raise first from None
            raise


def _load_image_only(path, trust_remote_code: bool):
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    name = _PROCESSORS.get(type(config).__name__, "Qwen2VLProcessor")
    processor = _image_only_class(name).from_pretrained(path, trust_remote_code=trust_remote_code,
                                                        local_files_only=True)
    if not getattr(processor, "chat_template", None):  # older folders: chat_template.json / tokenizer_config
        tpl = Path(path) / "chat_template.json"
        if tpl.exists():
            processor.chat_template = json.loads(tpl.read_text())["chat_template"]
        elif getattr(processor.tokenizer, "chat_template", None):
            processor.chat_template = processor.tokenizer.chat_template
    return processor
