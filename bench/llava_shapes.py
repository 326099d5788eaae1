"""LLaVA-1.5-shaped models with random weights (no download), shared by the benchmarks.

Shapes: "7b" (CLIP ViT-L/14-336 + Vicuna-7B, bf16: the real compute), "narrow" (the real GEOMETRY:
576 image tokens before the question, 32 decoder layers, LLaVA-1.5's prompt; widths cut to 32 so it
runs on a laptop CPU), "tiny" (a smoke test of the code path). The tokenizer is the organism's, the
chat template LLaVA-1.5's ("USER: <image>\\n{question} ASSISTANT:").
"""
from __future__ import annotations

import torch

LLAVA15_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' }}{%- for c in parts if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for c in parts if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}{%- for c in parts if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

SHAPES = ("7b", "narrow", "tiny")


def build_llava(shape: str, device: str = "cpu"):
    """An adapter over a random LlavaForConditionalGeneration of the given shape (see module doc)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ngguard.adapters import adapter_for
    from ngguard.organism.build import build_processor, build_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    tok = build_tokenizer()
    if shape == "7b":  # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B
        img, patch = 336, 14
        vis = CLIPVisionConfig(image_size=img, patch_size=patch, hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
        txt = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    elif shape == "narrow":  # 24 x 24 = 576 image tokens, 32 decoder layers, widths 32
        img, patch = 48, 2
        vis = CLIPVisionConfig(image_size=img, patch_size=patch, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2)
        txt = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=86, num_hidden_layers=32,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    else:
        img, patch = 48, 8
        vis = CLIPVisionConfig(image_size=img, patch_size=patch, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4)
        txt = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4)
    cfg = LlavaConfig(vision_config=vis, text_config=txt, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(img // patch) ** 2)
    dtype = torch.bfloat16 if shape == "7b" else torch.float32
    with torch.device(device):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).to(dtype)
        if shape == "narrow":  # weights of std 0.2, not 0.02: the localization's gradients are then large
            for p in model.parameters():  # enough to flip signs (with 0.02 nothing flips in 25 steps, and
                if p.dim() == 2:          # the agreement of the gates would be vacuous)
                    torch.nn.init.normal_(p, std=0.2)
    model.eval()
    processor = build_processor(tok)
    processor.chat_template = LLAVA15_TEMPLATE
    processor.patch_size = patch
    processor.image_processor.size = {"shortest_edge": img}
    processor.image_processor.crop_size = {"height": img, "width": img}
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return adapter_for(model, processor)
