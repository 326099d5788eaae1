"""Deprecated import path: now ``ngguard.methods.hooks`` (the edit engine lives in one wing, ``ngguard/methods/``)."""
from ngguard._moved import alias

alias(__name__, "ngguard.methods.hooks")
