"""Tunery: a self-hosted model-tuning service that speaks the Gemini API."""

__version__ = "0.1.0"
