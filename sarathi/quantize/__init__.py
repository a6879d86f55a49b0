"""`sarathi quantize`: RTN / AWQ / GPTQ weight quantization into standard HF checkpoints.

    python -m sarathi.quantize --model M --method {rtn,awq,gptq} --bits {4,8} --group-size G \\
        --calib FILE --out DIR [--desc-act] [--sym/--no-sym] [--num-samples N] [--seq-len L] ...

Outputs GPTQ "v1" checkpoints (AutoGPTQ / GPTQModel layout, rtn and gptq) or AutoAWQ GEMM
checkpoints (awq); `dequantize_checkpoint_tensor` / `dequantize_checkpoint` read them back.
"""
from sarathi.quantize.calib import QuantizeError
from sarathi.quantize.checkpoint import dequantize_checkpoint, load_dequantized_model, read_quantization_config
from sarathi.quantize.core import METHODS, QuantizeOptions, QuantizeReport, quantize
from sarathi.quantize.packing import (AWQ_ORDER, AWQ_REVERSE_ORDER, dequantize_checkpoint_tensor, pack_awq,
                                      pack_gptq, pack_int32, unpack_awq, unpack_gptq, unpack_int32)

__all__ = ["AWQ_ORDER", "AWQ_REVERSE_ORDER", "METHODS", "QuantizeError", "QuantizeOptions", "QuantizeReport",
           "dequantize_checkpoint", "dequantize_checkpoint_tensor", "load_dequantized_model", "main",
           "pack_awq", "pack_gptq", "pack_int32", "quantize", "read_quantization_config", "unpack_awq",
           "unpack_gptq", "unpack_int32"]


def main(argv=None) -> int:
    from sarathi.quantize.__main__ import main as _main

    return _main(argv)
