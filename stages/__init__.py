"""A declarative experiment pipeline for PyTorch vision models (one module per DVC stage)."""

from stages.errors import install_excepthook

install_excepthook()
