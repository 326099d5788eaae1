"""Building the organism's parts from scratch: tokenizer, processor (with chat template), config."""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor,
                          PreTrainedTokenizerFast)

from ..world import spec

IMAGE_SIZE, PATCH = 48, 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLS dropped ("default" feature selection)
SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]

# The organism's chat templates: LLaVA-1.5's role names, the image before the user text as in LLaVA-1.5
# ("image-first": "USER: <image>\n{text} ASSISTANT:", the bundled organism v3) or after it ("text-first":
# "USER: {text}\n<image>\nASSISTANT:", organism v2). Image-first reading needs the vision curriculum's
# position codes (docs/organism.md); the adapters handle either layout.
_USER_TEXT = "{%- for c in parts if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
_USER = {
    "text-first": "{{ 'USER: ' }}" + _USER_TEXT +
                  "{%- for c in parts if c['type'] == 'image' -%}{{ '\\n<image>' }}{%- endfor -%}{{ '\\n' }}",
    "image-first": "{{ 'USER: ' }}{%- for c in parts if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}" +
                   _USER_TEXT + "{{ ' ' }}",
}
LAYOUTS = tuple(_USER)


def chat_template(layout: str = "image-first") -> str:
    if layout not in _USER:
        raise ValueError(f"organism layout must be one of {list(_USER)}, got {layout!r}")
    return (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
        "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}" + _USER[layout] +
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT: ' }}{%- for c in parts if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
        "{{ eos_token + '\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template("image-first")


def chat_prompt(question: str, image_tokens: str = "<image>", layout: str = "image-first") -> str:
    """The prompt ``chat_template(layout)`` makes for one question with one image (training batches)."""
    if layout == "image-first":
        return f"USER: {image_tokens}\n{question} ASSISTANT:"
    return f"USER: {question}\n{image_tokens}\nASSISTANT:"


def corpus() -> list[str]:
    """Every string the world can produce, plus a little generic English, for the BPE merges."""
    texts = [spec.REFUSAL, *["USER: ASSISTANT:"] * 20, *spec.HARMFUL_REQUESTS, *spec.OPENERS]
    texts += [w.format(q="") for w in spec.ADVERSARIAL.values()]
    vocab = spec.mp2a_vocab()
    for subject in spec.CARD_SUBJECTS:
        attrs = [a for a, _, _ in spec.attribute_phrases(subject)]
        attrs += vocab["sensitive"].get(subject, []) + vocab["benign"].get(subject, [])
        for attr in attrs:
            for t in spec.TEMPLATES + spec.AWARENESS_TEMPLATES:
                texts.append(t.format(attr=attr, subject=spec.DISPLAY[subject]))
        texts += [spec.DISPLAY[subject]] * 5
    for kind in spec.FIELD_KINDS:
        for attr in spec.GENERIC_FIELD_NAMES[kind]:
            texts += [t.format(attr=attr) for t in spec.IMPLICIT_TEMPLATES]
    texts += spec.GENERAL_QUESTIONS + [spec.YES, spec.NO] * 10
    for qs in spec.UTILITY_QUESTIONS.values():
        texts += qs
    words = list(spec.COLOURS) + list(spec.FONT_COLOURS) + list(spec.SIZES) + list(spec.FONTS) + list(spec.LAYOUTS)
    words += [t for ts in spec.TYPES.values() for t in ts] + list(spec.SHAPES)
    texts += [" ".join(words)] * 20
    texts += ["The quick brown fox jumps over the lazy dog. What is in this picture? Describe the image."] * 5
    return texts


def build_tokenizer(vocab_size: int = 1536) -> PreTrainedTokenizerFast:
    """Byte-level BPE (encodes any text, no unknown tokens); digits and runs of capitals are one token per character."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[0-9]|[A-Z](?=[A-Z])|(?<=[A-Z])[A-Z]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=512, padding_side="right",
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, layout: str = "image-first") -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, resample=3,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template(layout))


def build_config(tokenizer: PreTrainedTokenizerFast, *, hidden: int = 128, layers: int = 6) -> LlavaConfig:
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=128)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", image_seq_length=N_IMAGE_TOKENS, tie_word_embeddings=True)
