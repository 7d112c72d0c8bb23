""" `python -m timm_rc.compress`: the command lives in `timm_rc.cli.compress`; this module keeps its old name
working (and, for one release, the library names it used to hold, with a DeprecationWarning). """
from ._deprecated import alias
from .cli.compress import main

__all__ = ['main']
__getattr__ = alias(__name__, {**dict.fromkeys(('model_size', 'weights_bytes', 'activation_bytes', 'cpu_latency_ms', 'compression_report'), 'timm_rc.compression'), **dict.fromkeys(('quantize_tensor', 'dequantize_tensor', 'quantize_state_dict', 'dequantize_state_dict', 'save_quantized', 'load_quantized', 'quantized_metadata', 'quantized_name', 'static_int8', 'untie_shared_weights', 'Int8Model', 'BITS', 'FORMAT', 'SCALE_SUFFIX'), 'timm_rc.quantize')})

if __name__ == '__main__':
    from .cli.common import run
    run(main)
