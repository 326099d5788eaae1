"""Deprecated import path: now ``ngguard.methods.core`` (the edit engine lives in one wing, ``ngguard/methods/``)."""
from ngguard._moved import alias

alias(__name__, "ngguard.methods.core")
