"""BLIP-2-shaped models (``Blip2ForConditionalGeneration``) with a decoder-only, LLaMA-style language
model -- in practice MiniGPT-4 (v1) converted by ``ngguard.convert.minigpt4``: EVA ViT-g + Q-Former
(``vision_model``, ``qformer``, ``query_tokens``), one linear projection (``language_projection`` =
MiniGPT-4's ``llama_proj``) and a LLaMA/Vicuna ``language_model`` (``LlamaForCausalLM``).

Layout: decoder layers at ``model.language_model.model.layers``; transformers 5 loads and saves BLIP-2
keys unrenamed, so ``parameter_name`` = ``state_dict_key`` = ``language_model.model.layers.N.mlp.down_proj.weight``.

Image tokens: the model replaces every ``config.image_token_id`` position of input_ids by one of the
``config.num_query_tokens`` Q-Former outputs. ``Blip2Processor`` (transformers 5.17 and 5.24) always
PREPENDS that many image tokens to the text (before BOS) and does not expand a placeholder inside it,
which cannot express MiniGPT-4's "<Img><ImageHere></Img>" in the middle of the prompt. So ``_process``
expands the one placeholder (``processor.image_token``, "<ImageHere>" for converted MiniGPT-4 folders) in
place into ``num_query_tokens`` image tokens itself and calls the tokenizer and image processor directly;
the processor object only carries them (+ the chat template). Everything else (labels, subject token,
generation) is the LLaVA logic.

Only decoder-only LMs with a LLaMA-style MLP (``mlp.down_proj``) are supported: stock BLIP-2 checkpoints
with OPT (``fc1``/``fc2``) or Flan-T5 (encoder-decoder) language models are refused with a one-line error.
``vision_only_inputs`` is empty: ``Blip2ForConditionalGeneration.forward`` always needs pixel_values.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from .hf_chat import HFChatAdapter

MINIGPT4_IMAGE_TOKEN = "<ImageHere>"
MINIGPT4_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. "
                   "You will be able to see the image once I provide it to you. Please answer my questions.")

# MiniGPT-4 (LLaMA-2 variant) conversation, as its demo builds it (CONV_VISION_LLama2): the system text,
# then per turn "<s>[INST] " + user message + " [/INST] " + answer; the image message is
# "<Img><ImageHere></Img>" joined to the question with a space. One deliberate difference: the generation
# prompt ends with " [/INST]" WITHOUT the trailing space, so that an answer appended with one space
# tokenises the same way in training (edit/localize) and in generation.
MINIGPT4_CHAT_TEMPLATE = (
    "{{ '" + MINIGPT4_SYSTEM + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<s>[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<Img>" + MINIGPT4_IMAGE_TOKEN
    + "</Img> ' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' [/INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' [/INST]' }}{% endif %}"
)


def minigpt4_prompt(text: str, image_token: str = MINIGPT4_IMAGE_TOKEN) -> str:
    """What ``MINIGPT4_CHAT_TEMPLATE`` renders for one user turn with one image + the generation prompt."""
    return f"{MINIGPT4_SYSTEM}<s>[INST] <Img>{image_token}</Img> {text} [/INST]"


class Blip2Adapter(HFChatAdapter):
    config_classes = ("Blip2Config",)
    model_classes = {"Blip2Config": "Blip2ForConditionalGeneration"}
    vision_only_inputs = ()
    prefix_cache = False

    def __init__(self, model: torch.nn.Module, processor) -> None:
        config = model.config
        if not getattr(config, "use_decoder_only_language_model", True):
            raise ValueError(f"BLIP-2 with an encoder-decoder language model ({type(config.text_config).__name__}) "
                             "is not supported; only decoder-only LLaMA-style language models (MiniGPT-4)")
        super().__init__(model, processor)
        # Blip2Processor drops chat_template on load; the tokenizer reads the same chat_template.jinja
        if processor is not None and not getattr(processor, "chat_template", None):
            template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
            if template:
                processor.chat_template = template
        layers = getattr(self.language_model, "layers", None)
        if not layers or not hasattr(getattr(layers[0], "mlp", None), "down_proj"):
            raise ValueError(f"BLIP-2 language model {type(model.language_model).__name__} has no LLaMA-style "
                             "decoder layers (layers[i].mlp.down_proj); supported: LLaMA/Vicuna (MiniGPT-4)")

    # ---- structure -------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        lm = self.model.language_model
        inner = getattr(lm, "model", None)
        return inner if inner is not None and hasattr(inner, "layers") else lm.get_decoder()

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def image_token(self) -> str:
        tok = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        return str(getattr(tok, "content", tok)) if tok is not None else "<image>"

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_query_tokens(self) -> int:
        return int(self.model.config.num_query_tokens)

    # ---- prompts and batches -----------------------------------------------------------------
    def chat_prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return super().chat_prompt(text)
        return minigpt4_prompt(text, self.image_token)

    def _process(self, images: list[Image.Image], texts: Sequence[str], *, padding_side: str = "left"):
        ph = self.image_token
        expanded = []
        for t in texts:
            if t.count(ph) != 1:
                raise ValueError(f"a BLIP-2 prompt needs exactly one image placeholder {ph!r}, "
                                 f"got {t.count(ph)} in {t!r}")
            expanded.append(t.replace(ph, ph * self.num_query_tokens))
        enc = self.tokenize(expanded, return_tensors="pt", padding=True, padding_side=padding_side,
                            return_token_type_ids=False)
        if self.tokenizer.convert_tokens_to_ids(ph) != self.image_token_id:
            raise ValueError(f"the tokenizer maps {ph!r} to {self.tokenizer.convert_tokens_to_ids(ph)}, the model "
                             f"expects image token id {self.image_token_id}")
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixels}
