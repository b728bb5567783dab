"""Robust decode and encode of images (Pillow). No torch here."""
