"""Converters from original (non-transformers) checkpoints to HF folders that ``load_adapter`` reads.

    from ngguard.convert import convert_minigpt4
    convert_minigpt4("pretrained_minigpt4_llama2_7b.pth", "Llama-2-7b-chat-hf", "blip2-flan-t5-xxl", "minigpt4-hf")

CLI: ``ngguard convert minigpt4 --ckpt MINIGPT4.pth --llm LLAMA_DIR --blip2 BLIP2_DIR --out DIR``
(the handler: ``ngguard.cli.convert``).
"""
from __future__ import annotations

from .minigpt4 import ConversionError, convert_minigpt4, map_minigpt4_key

__all__ = ["ConversionError", "convert_minigpt4", "map_minigpt4_key"]
