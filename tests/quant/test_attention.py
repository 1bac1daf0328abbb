"""Attention matmul quantization: Q·Kᵀ and softmax·V operands, checked against a hand-written reference."""

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import SwinUNETR

from mqb.quant import QuantRecipe, QuantSpec, calibrate, dequantize, fake_quantize, quantize, quantized_layers


def _per_token(t: torch.Tensor, axis: int, bits: int) -> torch.Tensor:
    return fake_quantize(t.movedim(axis, -1), bits=bits, granularity="per_token").movedim(-1, axis)


def _reference(block: SABlock, x: torch.Tensor, bits: int) -> torch.Tensor:
    """SABlock forward written out with per-token quantized Q, K (along d) and P, V (along the key axis)."""
    b, n, c = x.shape
    h = block.num_heads
    q, k, v = block.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    att = torch.einsum("bhxd,bhyd->bhxy", _per_token(q, -1, bits), _per_token(k, -1, bits)) * block.scale
    att = att.softmax(dim=-1)
    out = torch.einsum("bhxy,bhyd->bhxd", _per_token(att, -1, bits), _per_token(v, 2, bits))
    return block.out_proj(out.permute(0, 2, 1, 3).reshape(b, n, c))


@pytest.mark.parametrize("flash", [False, True])
def test_sablock_operands_match_reference(flash):
    torch.manual_seed(0)
    block = SABlock(hidden_size=32, num_heads=4, qkv_bias=True, use_flash_attention=flash).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        ref_float = block(x)
        ref_quant = _reference(block, x, bits=4)
    recipe = QuantRecipe(weight=None, activation=QuantSpec(bits=4), include=(), attention=True)
    quantize(block, recipe)
    with torch.no_grad():
        out = block(x)
    assert sorted(block.operand_quantizers) == ["mm0_a", "mm0_b", "mm1_a", "mm1_b"]
    torch.testing.assert_close(out, ref_quant, rtol=1e-4, atol=1e-5)
    assert (out - ref_float).abs().max() > 1e-3
    dequantize(block, "attention")
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref_float)


def test_swinunetr_window_attention_static_per_tensor():
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    quantize(model, QuantRecipe.from_precision("w8a8", scheme="per_tensor", attention=True))
    calibrate(model, [x])
    attn = [m for _, m in quantized_layers(model) if m.mqb_info.kind == "attention"]
    assert len(attn) == 4
    for layer in attn:
        assert sorted(layer.operand_quantizers) == ["mm0_a", "mm0_b", "mm1_a", "mm1_b"]
        assert all(q.amax is not None and q.amax.ndim == 0 for q in layer.operand_quantizers.values())
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
