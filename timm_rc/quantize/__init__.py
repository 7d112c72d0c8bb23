""" Quantization on top of RC: the compression the paper stacks on weight sharing.

    from timm_rc.quantize import Int8WeightOnlyConfig, quantize_, save_quantized, load_quantized, static_int8
    quantize_(model, Int8WeightOnlyConfig())                # weights rounded to int8 in place (fp32 storage)
    save_quantized(model, 'model.int8.safetensors', Int4WeightOnlyConfig(group_size=32))  # shared weights once
    model = load_quantized('model.int8.safetensors')        # built from the file's metadata
    int8 = static_int8(model, calibration_batches)          # real int8 inference on the CPU (PT2E)

One module per scheme (`weight_only`: int8 per output channel, int4 in groups; `pt2e`: static int8 through PT2E);
`files` holds the file format and the registry `SCHEMES`, keyed by the scheme name stored in a file's
metadata.
"""
from .files import BITS, FORMAT, SCALE_SUFFIX, SCHEMES, config_for_bits, dequantize_state_dict, dequantize_tensor, \
    int8_weights, is_quantized, load_quantized, quantize_, quantize_state_dict, quantize_tensor, quantized_file_bytes, \
    quantized_metadata, quantized_name, register_scheme, save_quantized, scheme_from_metadata, unique_tensors
from .pt2e import Int8Model, static_int8, untie_shared_weights
from .weight_only import DEFAULT_GROUP_SIZE, Int4WeightOnlyConfig, Int8WeightOnlyConfig

__all__ = ['Int8WeightOnlyConfig', 'Int4WeightOnlyConfig', 'DEFAULT_GROUP_SIZE', 'quantize_', 'save_quantized',
           'load_quantized', 'int8_weights', 'quantized_metadata', 'is_quantized', 'quantized_name', 'quantize_state_dict',
           'dequantize_state_dict', 'quantize_tensor', 'dequantize_tensor', 'quantized_file_bytes', 'unique_tensors',
           'SCHEMES', 'register_scheme', 'scheme_from_metadata', 'config_for_bits', 'FORMAT', 'SCALE_SUFFIX', 'BITS',
           'static_int8', 'untie_shared_weights', 'Int8Model']
