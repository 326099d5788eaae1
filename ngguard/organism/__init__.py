"""The model organism: a tiny LLaVA-architecture model trained on the synthetic privacy world.

It ships in the package (``checkpoint/``) and loads through the same code as a llava-hf checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


@dataclass(frozen=True)
class TrainSettings:
    """How `ngguard organism train` trains the organism; the defaults reproduce the bundled checkpoint."""

    layout: str = "text-first"    # where the image sits in the prompt: text-first | image-first
    layers: int = 6               # language-model layers
    glyph_steps: int = 400        # stage 1: vision curriculum steps
    steps: int = 2600             # stage 2: chat-mix steps
    batch_size: int = 48
    lr: float = 1.5e-3            # stage 2 peak learning rate (cosine to 10 %)
    warmup: int = 100             # stage 2 warm-up steps
    position_codes: bool = False  # stage 1 also teaches every image token its grid row and column


def checkpoint_path() -> Path:
    """Folder of the bundled organism checkpoint (a standard HF LLaVA folder)."""
    if not (CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"the bundled organism checkpoint is missing at {CHECKPOINT}; "
                                "train it with `ngguard organism train`")
    return CHECKPOINT
