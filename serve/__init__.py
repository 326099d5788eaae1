"""The ngguard Gradio demo (see serve/app.py)."""
