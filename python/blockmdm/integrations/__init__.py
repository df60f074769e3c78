"""Adapters to other ecosystems. Each submodule imports its ecosystem lazily and only when it is
itself imported, so ``import blockmdm`` never needs them:

- :mod:`blockmdm.integrations.transformers`: Hugging Face transformers (extra ``hf``): the
  ``"blockmdm"`` attention backend, decoding of HF models and ``masked_diffusion_loss``.
"""
