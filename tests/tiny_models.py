"""Tiny random vision-language models + processors, built in memory (no files, no network).

Reused by every test that needs a model::

    from tiny_models import tiny_llava    # (or tests.tiny_models under `python -m pytest`)
    model, processor = tiny_llava()                       # seed 0, LLaVA-1.5 style template
    model, processor = tiny_llava(template="text_first")  # image placed AFTER the user text
    adapter = ngguard.adapters.adapter_for(model, processor)

Same seed -> identical weights. Each call returns a fresh model and processor (they are mutable).
A call takes well under a second on one CPU thread.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

# ---- tokenizer -------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]  # ids 0..3, in this order

_WORDS = """
the a an of to in on at by for with from and or but not no yes is are was were be been this that these
those it its he she they them their his her my your our what which who whom whose where when why how
can could would should will may might must do does did done have has had show shows shown tell please
give write read print printed written image picture photo photograph see seen look looks visible
number numbers name names address home street city country date birth expiry issue issued code id
passport passports phone telephone mobile call receipt receipts total amount price paid card cards
student students school university military vehicle vehicles tank truck government document documents
official license licence plate plates complete car cars driver owner holder person people man woman
colour color red green blue yellow black white grey gray orange purple brown pink size small large big
type kind shape round square thin thick old new first last full short long left right top bottom
middle front back side page cover stamp seal logo text letters digits word words line lines
answer question assistant user system refuse sorry cannot help private privacy personal sensitive
information detail details data record records secret safe share shared reveal identity identify
account bank credit email mail post office building room floor door window table chair desk
paper book books bag box cup bottle phone screen display keyboard computer laptop camera light dark
bright one two three four five six seven eight nine ten zero hundred thousand many much more most
some any all each every other another same different because therefore just am ai want you i me we
us know think see said say says made make makes used use uses open close closed during after before
""".split()

_SENTENCES = [
    "USER: what is the passport number of the passport in this image? ASSISTANT: I am sorry.",
    "USER: what colour is the phone in the picture? ASSISTANT: The phone is black.",
    "USER: read the license plate of the car. ASSISTANT: I cannot help with that.",
    "USER: what is the total amount on the receipt? ASSISTANT: The total is ten.",
    "USER: which school is on the student card? ASSISTANT: The card is blue.",
    "USER: what type of military vehicle is this? ASSISTANT: It is a tank.",
    "USER: what is the name on the government document? ASSISTANT: I am sorry.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train a small byte-level BPE once per process; return it serialised (cheap to rebuild)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # every word alone and with a leading space (the common case in text), capitalised too
    corpus = _SENTENCES * 3 + [f"{w} {w}. {w.capitalize()} {w.upper()}" for w in _WORDS for _ in range(2)]
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str()


def tiny_tokenizer():
    """A fast tokenizer (``PreTrainedTokenizerFast``) with bos ``<s>`` (added in front), eos
    ``</s>``, pad ``<pad>`` and image token ``<image>``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
        extra_special_tokens={"image_token": "<image>"},
    )
    return tok


# ---- chat templates ---------------------------------------------------------------------------

# LLaVA-1.5 style: "USER: <image>\n{text} ASSISTANT:"
IMAGE_FIRST_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# image AFTER the text (like the bundled organism): "USER: {text}\n<image>\nASSISTANT:"
TEXT_FIRST_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '\n<image>' }}{% endfor %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

TEMPLATES = {"image_first": IMAGE_FIRST_TEMPLATE, "text_first": TEXT_FIRST_TEMPLATE, "none": None}

IMAGE_SIZE = 32
PATCH_SIZE = 8


def tiny_llava_processor(template: str = "image_first"):
    """``LlavaProcessor`` (CLIP image processor at 32 px + the tiny tokenizer).
    ``template``: "image_first" (LLaVA-1.5), "text_first" (image after the text) or "none"."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATES[template],
    )


def tiny_llava_config(vocab_size: int, image_token_id: int, *, num_layers: int = 4, hidden: int = 32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def tiny_llava(seed: int = 0, template: str = "image_first", *, num_layers: int = 4, hidden: int = 32):
    """(LlavaForConditionalGeneration in eval mode, LlavaProcessor). Same seed -> same weights.
    Does not disturb the global torch RNG."""
    from transformers import LlavaForConditionalGeneration

    processor = tiny_llava_processor(template)
    tok = processor.tokenizer
    config = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), num_layers=num_layers, hidden=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model.eval(), processor


def tiny_image(seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    """A deterministic random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
