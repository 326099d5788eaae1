"""Deprecated import path: now ``ngguard.world.corpus`` (the organism's text belongs to its world)."""
from ngguard._moved import alias

alias(__name__, "ngguard.world.corpus")
