"""The model organism: a tiny LLaVA-architecture model trained on the synthetic privacy world.

It ships in the package (``checkpoint/``) and loads through the same code as a llava-hf checkpoint.
"""
from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def checkpoint_path() -> Path:
    """Folder of the bundled organism checkpoint (a standard HF LLaVA folder)."""
    if not (CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"the bundled organism checkpoint is missing at {CHECKPOINT}; "
                                "train it with `ngguard organism train`")
    return CHECKPOINT
