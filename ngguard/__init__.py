"""ngguard: Neural Gate privacy editing for vision-language models."""
__version__ = "0.1.0"
