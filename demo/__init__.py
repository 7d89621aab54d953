"""The web demo (`honeybee-demo`, app.py: Gradio) and the visual-token maps (`honeybee-visualize`, visualize.py),
over a UI-free chat (chat.py)."""
