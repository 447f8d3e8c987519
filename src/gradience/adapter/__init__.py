"""Reading LoRA adapters (SPEC §2): discovery, safetensors / sharded / pickled weights, pairing, rank and scale.

Importing this package never imports torch; only reading a pickled ``adapter_model.bin`` / ``.pt`` needs it.
"""

from gradience.adapter.config import module_rank, module_scale, pattern_key, read_adapter_config
from gradience.adapter.discovery import list_adapters
from gradience.adapter.loader import adapter_from_state_dict, load_adapter
from gradience.adapter.model import LoadedAdapter, LoraPair, NonLoraTensors

__all__ = [
    "LoadedAdapter",
    "LoraPair",
    "NonLoraTensors",
    "adapter_from_state_dict",
    "list_adapters",
    "load_adapter",
    "module_rank",
    "module_scale",
    "pattern_key",
    "read_adapter_config",
]
