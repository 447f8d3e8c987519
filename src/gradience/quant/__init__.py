"""De-quantisation of 4-bit (QLoRA) base weights in numpy: no GPU, no bitsandbytes at read time.

``bnb4`` reads the tensors transformers writes for a bitsandbytes 4-bit checkpoint (packed codes, block absmax,
quant map, optional nested absmax) and returns the float32 weight bitsandbytes itself would compute.
"""

from gradience.quant.bnb4 import (
    Bnb4State,
    bnb4_companion_keys,
    code_table,
    dequantize_4bit,
    parse_bnb4_state,
    quantize_4bit,
)

__all__ = [
    "Bnb4State",
    "bnb4_companion_keys",
    "code_table",
    "dequantize_4bit",
    "parse_bnb4_state",
    "quantize_4bit",
]
