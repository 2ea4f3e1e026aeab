"""Small utilities shared by every part of the framework (kept import-compatible with the paper's code)."""

from . import util
from .util import EasyDict

__all__ = ['EasyDict', 'util']
