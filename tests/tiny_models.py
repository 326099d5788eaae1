"""Tiny random vision-language models + processors, built in memory (no files, no network).

Reused by every test that needs a model::

    from tiny_models import tiny_llava    # (or tests.tiny_models under `python -m pytest`)
    model, processor = tiny_llava()                       # seed 0, LLaVA-1.5 style template
    model, processor = tiny_llava(template="text_first")  # image placed AFTER the user text
    adapter = ngguard.adapters.adapter_for(model, processor)

Other families, same contract: ``tiny_llava_next`` (anyres tiling; use ``tiny_image_varied`` for
images of different sizes), ``tiny_qwen2_vl`` (``version="2"`` or ``"2.5"``; M-RoPE, Qwen chat template)
and ``tiny_minigpt4`` (BLIP-2 shape with a LLaMA language model, MiniGPT-4 prompt).

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

    return _llava_style_processor(LlavaProcessor, CLIPImageProcessor, template)


def _llava_style_processor(processor_class, image_processor_class, template: str, **image_kwargs):
    """``processor_class`` over ``image_processor_class`` at ``IMAGE_SIZE`` px and the tiny tokenizer."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    image_processor = image_processor_class(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            do_convert_rgb=True, **image_kwargs)
    return processor_class(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=PATCH_SIZE,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                           chat_template=TEMPLATES[template])


def tiny_llava_config(vocab_size: int, image_token_id: int, *, num_layers: int = 4, hidden: int = 32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
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


# ---- LLaVA-NeXT (anyres tiling) -----------------------------------------------------------------

# (height, width) grids the anyres tiler may choose from; 32 px tiles like the base image
NEXT_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def tiny_llava_next_processor(template: str = "image_first"):
    """``LlavaNextProcessor`` (LLaVA-NeXT image processor at 32 px tiles, anyres over
    ``NEXT_GRID_PINPOINTS``) + the tiny tokenizer. The number of image tokens depends on the image's
    aspect ratio (base 4x4 patches + CLS, plus the unpadded tile features and one newline per row)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    return _llava_style_processor(LlavaNextProcessor, LlavaNextImageProcessor, template,
                                  image_grid_pinpoints=NEXT_GRID_PINPOINTS, do_pad=True)


def tiny_llava_next(seed: int = 0, template: str = "image_first", *, num_layers: int = 4, hidden: int = 32):
    """(LlavaNextForConditionalGeneration in eval mode, LlavaNextProcessor). Same seed -> same weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    processor = tiny_llava_next_processor(template)
    tok = processor.tokenizer
    base = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), num_layers=num_layers, hidden=hidden)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**base.vision_config.to_diff_dict()),
        text_config=LlamaConfig(**base.text_config.to_diff_dict()),
        image_token_index=base.image_token_index,
        image_grid_pinpoints=NEXT_GRID_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    _set_generation_ids(model, tok)
    return model.eval(), processor


def _set_generation_ids(model, tok) -> None:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id


def tiny_image_varied(seed: int = 0) -> Image.Image:
    """A deterministic random RGB image whose size depends on the seed (32x32, 32x48, 48x32, 40x40):
    exercises anyres tiling / dynamic resolution (different image-token counts per row)."""
    h, w = [(IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, 48), (48, IMAGE_SIZE), (40, 40)][seed % 4]
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ---- Qwen2-VL (dynamic resolution, M-RoPE) ----------------------------------------------------------

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL-Instruct's chat template (system turn by default, vision tokens inline, no BOS)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_PATCH = 4          # 4 px patches, 2x2 merge: a 32x32 image -> 8x8 patches -> 16 image tokens
QWEN_MERGE = 2


def tiny_qwen_tokenizer():
    """The tiny BPE with Qwen's special tokens and conventions: no BOS, eos ``<|im_end|>``, pad
    ``<|endoftext|>``, image token ``<|image_pad|>``."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_tokenizer_json())
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )


def tiny_qwen2_vl_processor(processor_class: str = "Qwen2VLProcessor"):
    """``Qwen2VLProcessor`` (or ``Qwen2_5_VLProcessor``): the tiny Qwen tokenizer + a Qwen2-VL image
    processor with 4 px patches, 2x2 merge and at most 32x32 px (so an image gives 9..16 image tokens)."""
    from transformers import Qwen2VLImageProcessor

    from ngguard.adapters.qwen2_vl import image_only_processor

    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 16 * 16, "longest_edge": IMAGE_SIZE * IMAGE_SIZE},
        patch_size=QWEN_PATCH,
        temporal_patch_size=2,
        merge_size=QWEN_MERGE,
    )
    # the stock class without its video processor (which needs torchvision): the same on every machine;
    # load_adapter reloads it as the stock processor where torchvision is installed
    return image_only_processor(image_processor, tiny_qwen_tokenizer(), QWEN2_VL_TEMPLATE, processor_class)


def tiny_qwen2_vl(seed: int = 0, *, num_layers: int = 4, hidden: int = 32, version: str = "2"):
    """(Qwen2VLForConditionalGeneration in eval mode, Qwen2VLProcessor); ``version="2.5"``: the
    Qwen2.5-VL classes (window-attention vision tower, same language model). Same seed -> same weights."""
    import transformers

    if version not in ("2", "2.5"):
        raise ValueError(f"unknown Qwen-VL version {version!r}; choose 2 or 2.5")
    prefix = "Qwen2VL" if version == "2" else "Qwen2_5_VL"
    processor = tiny_qwen2_vl_processor(f"{prefix}Processor")
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden // 2
    section = [head_dim // 8, 3 * head_dim // 16]
    common = {"depth": 2, "num_heads": 2, "in_channels": 3, "patch_size": QWEN_PATCH,
              "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": 2}
    if version == "2":
        vision = {**common, "embed_dim": 32, "hidden_size": hidden, "mlp_ratio": 2}
    else:
        vision = {**common, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": hidden,
                  "window_size": 2 * QWEN_PATCH * QWEN_MERGE, "fullatt_block_indexes": [1]}
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision,
        text_config={
            "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": num_layers, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "rope_parameters": {
                "rope_type": "default", "rope_theta": 10000.0,
                "mrope_section": [*section, head_dim // 2 - sum(section)],
            },
            "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    _set_generation_ids(model, tok)
    return model.eval(), processor


# ---- MiniGPT-4 (BLIP-2 shape: ViT + Q-Former + linear projection + LLaMA) ------------------------------

MINIGPT4_QUERY_TOKENS = 4


def tiny_minigpt4_tokenizer():
    """The tiny BPE as MiniGPT-4's LLaMA tokenizer after conversion: bos ``<s>`` in front, eos ``</s>``,
    pad ``<pad>``, image placeholder ``<ImageHere>`` (special, the tokenizer's ``image_token``) and the
    MiniGPT-4 chat template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from ngguard.adapters.blip2 import MINIGPT4_CHAT_TEMPLATE, MINIGPT4_IMAGE_TOKEN

    raw = Tokenizer.from_str(_tokenizer_json())
    raw.add_special_tokens([AddedToken(MINIGPT4_IMAGE_TOKEN, special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token=None, extra_special_tokens={"image_token": MINIGPT4_IMAGE_TOKEN})
    tok.chat_template = MINIGPT4_CHAT_TEMPLATE
    return tok


def tiny_minigpt4_configs(vocab_size: int, image_token_id: int, *, num_layers: int = 4, hidden: int = 32):
    """(vision, qformer, text) configs of a tiny MiniGPT-4: EVA-like ViT 48 wide, Q-Former 40 wide,
    LLaMA ``hidden`` wide -- three different widths, so a mix-up of projections shows as a shape error."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig

    vision = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                               image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, qkv_bias=True)
    qformer = Blip2QFormerConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                                 cross_attention_frequency=2, encoder_hidden_size=48, vocab_size=64,
                                 max_position_embeddings=32)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                       # 512: the 105 query tokens + a fake dialogue fit the context-derived token budget
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return vision, qformer, text


def tiny_minigpt4(seed: int = 0, *, num_layers: int = 4, hidden: int = 32):
    """(Blip2ForConditionalGeneration with a LLaMA language model = a tiny MiniGPT-4, in eval mode;
    Blip2Processor with the MiniGPT-4 chat template), built like ``ngguard convert minigpt4`` builds it.
    Same seed -> same weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from ngguard.convert.minigpt4 import minigpt4_image_processor, minigpt4_processor

    tok = tiny_minigpt4_tokenizer()
    vision, qformer, text = tiny_minigpt4_configs(len(tok), tok.image_token_id, num_layers=num_layers, hidden=hidden)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=MINIGPT4_QUERY_TOKENS, image_token_index=tok.image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        # transformers initialises query_tokens to zeros: random ones make the images distinguishable
        model.query_tokens.data.normal_(0, 1.0)
    _set_generation_ids(model, tok)
    processor = minigpt4_processor(tok, minigpt4_image_processor(IMAGE_SIZE), MINIGPT4_QUERY_TOKENS)
    return model.eval(), processor


# ---- a real protection patch for a tiny model -----------------------------------------------------------


def tiny_patch(adapter, folder, *, layer: int = 1, seed: int = 1, subjects=("Passport",), extra=None):
    """Save ``adapter``'s model to ``folder/base`` and write a patch of its layer-``layer`` down_proj
    (base + N(0, 1) noise, large enough to change answers) to ``folder/patch``; returns that folder."""
    from pathlib import Path

    from ngguard.patch import write_patch

    folder = Path(folder)
    adapter.model.save_pretrained(folder / "base")
    key = adapter.state_dict_key(layer, "down_proj")
    w = adapter.model.get_parameter(key).detach()
    new = w + torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    write_patch(folder / "patch", {key: new}, base_dir=folder / "base", recipe_hash="t", layers=[layer],
                method="neural_gate", gate_stats={}, subjects=list(subjects), model=adapter.model, extra=extra)
    return folder / "patch"
