"""Deprecated import path, kept for one release (importing it warns; no project code uses it): localization
lives in ``ngguard.methods.neural_gate`` (the paper's Eq. 1-5), its exact speed-ups in
``ngguard.methods.fastpath``, the hooks in ``ngguard.methods.hooks``, the shared types and losses in
``ngguard.methods.core``."""
from __future__ import annotations

import warnings

from .compat import forward_features
from .methods.core import Row, Sample, chunk_by_sample, encode_rows, jaccard, row_nll
from .methods.fastpath import causal_mask, prefix_length, record_layer_output, target_window
from .methods.hooks import edit_subject_state, replayed_prefix
from .methods.neural_gate import LayerLocalization, gates_from_scales, localize_layer, sample_rows
from .methods.registry import DEFAULT_CONTEXTS

__all__ = ["DEFAULT_CONTEXTS", "LayerLocalization", "Row", "Sample", "causal_mask", "chunk_by_sample",
           "edit_subject_state", "encode_rows", "forward_features", "gates_from_scales", "jaccard", "localize_layer",
           "prefix_length", "record_layer_output", "replayed_prefix", "row_nll", "sample_rows", "target_window"]

warnings.warn("ngguard.localize is deprecated and goes in a later release: import from ngguard.methods.neural_gate "
              "(localize_layer, gates_from_scales, LayerLocalization, sample_rows), ngguard.methods.core, "
              "ngguard.methods.fastpath or ngguard.methods.hooks", DeprecationWarning, stacklevel=2)
