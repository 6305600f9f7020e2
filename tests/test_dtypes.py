import pytest
import torch

from qlora_kit.dtypes import NAMES, dtype_bytes, dtype_name, lookup, parse_dtype


@pytest.mark.parametrize("spellings,dtype,size", [
    (("fp32", "float32", "F32", "torch.float32"), torch.float32, 4),
    (("bf16", "bfloat16", "BF16", "torch.bfloat16"), torch.bfloat16, 2),
    (("fp16", "float16", "F16", "torch.float16"), torch.float16, 2),
])
def test_every_spelling_names_one_dtype(spellings, dtype, size):
    for s in spellings:
        assert parse_dtype(s) is dtype
        assert dtype_bytes(s) == size == torch.empty(0, dtype=dtype).element_size()
    assert dtype_name(dtype) in NAMES and parse_dtype(dtype_name(dtype)) is dtype
    assert lookup(dtype).long == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("bad", ["fp8", "int8", "", torch.int8])
def test_unknown_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match="use one of fp32, bf16, fp16"):
        parse_dtype(bad)
