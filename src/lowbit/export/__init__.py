"""Writing quantized models: atomic output directories; packed formats come in later issues."""

from .atomic import OutputExistsError, atomic_directory, check_output_dir
from .checkpoint import save_model_dir

__all__ = ["OutputExistsError", "atomic_directory", "check_output_dir", "save_model_dir"]
