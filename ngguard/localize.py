"""Deprecated import path (kept so old imports work): localization now lives in
``ngguard.methods.neural_gate`` (the paper's Eq. 1-5), its exact speed-ups in ``ngguard.fastpath``,
the hooks in ``ngguard.hooks`` and the shared types and losses in ``ngguard.core``."""
from __future__ import annotations

from .compat import forward_features
from .core import Row, Sample, chunk_by_sample, encode_rows, jaccard, row_nll
from .fastpath import causal_mask, prefix_length, record_layer_output, target_window
from .hooks import edit_subject_state, replayed_prefix
from .methods.neural_gate import LayerLocalization, gates_from_scales, localize_layer, sample_rows
from .recipe import DEFAULT_CONTEXTS

__all__ = ["DEFAULT_CONTEXTS", "LayerLocalization", "Row", "Sample", "causal_mask", "chunk_by_sample",
           "edit_subject_state", "encode_rows", "forward_features", "gates_from_scales", "jaccard", "localize_layer",
           "prefix_length", "record_layer_output", "replayed_prefix", "row_nll", "sample_rows", "target_window"]
