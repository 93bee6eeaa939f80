"""Llama-family models: architecture from config.json, our forward pass, the loader, presets."""

from engine.model.arch import ModelArch
from engine.model.llama import LlamaForCausalLM
from engine.model.loader import LoadedModel, load_model

__all__ = ["LlamaForCausalLM", "LoadedModel", "ModelArch", "load_model"]
