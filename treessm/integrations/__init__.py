"""Bridges to other libraries (timm, ...). Each submodule imports its library lazily and
stays importable when that library is missing."""
