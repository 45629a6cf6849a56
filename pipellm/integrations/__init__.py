"""Adapters between pipellm and the stacks that move LLM data (PyTorch: ``pipellm.integrations.torch``)."""
