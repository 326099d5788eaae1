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

    layout: str = "image-first"   # where the image sits in the prompt: image-first (LLaVA-1.5) | text-first
    layers: int = 8               # language-model layers
    glyph_steps: int = 1000       # stage 1: vision curriculum steps
    steps: int = 3200             # stage 2: chat-mix steps
    batch_size: int = 48
    lr: float = 1e-3              # stage 2 peak learning rate (cosine to 10 %)
    warmup: int = 300             # stage 2 warm-up steps
    position_codes: bool = True   # stage 1 also teaches every image token its grid row and column
    focus_steps: int = 800        # stage 3: steps on batches rich in the skills stage 2 under-trains (0: none)
    focus_share: float = 0.6      # stage 3: share of each batch drawn from those skills (train.FOCUS_SKILLS)
    focus_lr: float = 3e-4        # stage 3 peak learning rate (50 warm-up steps, cosine to 10 %)
    # v2 (text-first, 6 layers, 2600 steps, 400 glyph steps, lr 1.5e-3, warm-up 100, no position codes)
    # is `--layout text-first --layers 6 --steps 2600 --glyph-steps 400 --lr 1.5e-3 --warmup 100
    # --no-position-codes --focus-steps 0`; v3 (stages 1-2 only) is `--focus-steps 0`.


def checkpoint_path() -> Path:
    """Folder of the bundled organism checkpoint (a standard HF LLaVA folder)."""
    if not (CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"the bundled organism checkpoint is missing at {CHECKPOINT}; "
                                "train it with `ngguard organism train`")
    return CHECKPOINT
