"""MedPTQ TransUNet3D: reference state-dict layout, nn.MultiheadAttention equivalence, quantization, Hydra config."""

import copy
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from mqb.config import CONF_DIR, register_configs
from mqb.models.transunet import MultiheadSelfAttention, TransformerBlock, TransUNet3D
from mqb.quant import QuantRecipe, QuantSpec, calibrate, fake_quantize, quantize, summarize
from tests.models.reference import KEYS, quantized_errors, random_state

register_configs()

#: A small configuration with the same layout (fast to quantize on a CPU).
SMALL = dict(img_size=32, base_channels=8, embed_dim=64, mlp_dim=128, num_heads=4, num_layers=2)


@pytest.fixture(scope="module")
def reference_net():
    """The trained MedPTQ configuration (defaults) loaded strictly with a state dict built from the key list."""
    ref = json.loads((KEYS / "transunet3d.json").read_text())
    net = TransUNet3D(in_channels=ref["in_channels"], out_channels=ref["out_channels"]).eval()
    state = random_state(ref["keys"])
    net.load_state_dict(state, strict=True)
    return net, ref, state


def test_defaults_are_the_trained_configuration():
    net = TransUNet3D()
    assert sum(p.numel() for p in net.parameters()) == 91_590_094
    assert len(net.state_dict()) == 283
    assert net.img_size == (96, 96, 96) and net.position_embeddings.shape == (1, 216, 768)


def test_state_dict_keys_shapes_and_round_trip(reference_net):
    net, ref, state = reference_net
    saved = net.state_dict()
    assert {k: list(v.shape) for k, v in saved.items()} == ref["keys"]
    assert sum(p.numel() for p in net.parameters()) == ref["params"]
    assert all(torch.equal(saved[k], state[k]) for k in state)
    assert "transformer_blocks.11.self_attn.in_proj_weight" in saved
    assert not any(".in_proj.weight" in k or ".in_proj.bias" in k for k in saved)
    # the projection is a real nn.Linear child under the reference's packed parameter names
    attn = net.transformer_blocks[3].self_attn
    assert type(attn.in_proj) is nn.Linear and attn.in_proj.weight.shape == (2304, 768)
    assert torch.equal(attn.in_proj.weight, state["transformer_blocks.3.self_attn.in_proj_weight"])


def test_forward_at_the_trained_window(reference_net):
    net, ref, _ = reference_net
    with torch.no_grad():
        out = net(torch.randn(1, ref["in_channels"], 96, 96, 96))
    assert out.shape == (1, ref["out_channels"], 96, 96, 96) and torch.isfinite(out).all()


def test_state_dict_round_trip_small_and_copies():
    torch.manual_seed(0)
    a = TransUNet3D(**SMALL).eval()
    b = TransUNet3D(**SMALL).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    c = copy.deepcopy(a)  # quantize(inplace=False) deep-copies: the key hooks must follow
    assert list(c.state_dict()) == list(a.state_dict())
    # the native spelling (in_proj.weight) loads too
    native = {k.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias"): v
              for k, v in a.state_dict().items()}  # fmt: skip
    assert "transformer_blocks.0.self_attn.in_proj.weight" in native
    c.load_state_dict(native, strict=True)
    with torch.no_grad():
        assert torch.equal(c(x), a(x))


@pytest.mark.parametrize("embed_dim,num_heads,length", [(64, 4, 27), (768, 12, 216)])
def test_attention_equals_torch_multihead_attention(embed_dim, num_heads, length):
    """Same weights, same outputs as nn.MultiheadAttention(batch_first=False)(x, x, x)[0]: checkpoints transfer."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed_dim, num_heads, dropout=0.1, batch_first=False).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.1)
        mha.out_proj.bias.normal_(0, 0.1)
    ours = MultiheadSelfAttention(embed_dim, num_heads, dropout=0.1).eval()
    ours.load_state_dict(mha.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(mha.state_dict())
    x = torch.randn(length, 2, embed_dim) * 2  # sequence-first (N, B, C)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), mha(x, x, x)[0], rtol=1e-5, atol=2e-6)
    mha2 = nn.MultiheadAttention(embed_dim, num_heads, dropout=0.1).eval()
    mha2.load_state_dict(ours.state_dict(), strict=True)  # and back
    assert torch.equal(mha2.in_proj_weight, mha.in_proj_weight)


def test_block_equals_torch_post_ln_encoder_layer():
    """The reference block is nn.TransformerEncoderLayer(gelu, post-LN): identical key names and outputs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, activation="gelu", norm_first=False).eval()
    block = TransformerBlock(64, 4, 128, dropout=0.1).eval()
    block.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(27, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), layer(x), rtol=1e-5, atol=2e-6)


def test_attention_operands_are_quantized_like_a_hand_written_reference():
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(64, 4).eval()
    x = torch.randn(27, 2, 64)

    def pt(t: torch.Tensor, axis: int) -> torch.Tensor:
        return fake_quantize(t.movedim(axis, -1), bits=4, granularity="per_token").movedim(-1, axis)

    with torch.no_grad():
        ref_float = attn(x)
        q, k, v = (t.reshape(27, 8, 16).transpose(0, 1) for t in attn.in_proj(x).chunk(3, dim=-1))
        probs = (pt(q / 4.0, -1) @ pt(k.transpose(-2, -1), -2)).softmax(-1)
        ref_quant = attn.out_proj((pt(probs, -1) @ pt(v, -2)).transpose(0, 1).reshape(27, 2, 64))
    quantize(attn, QuantRecipe(weight=None, activation=QuantSpec(bits=4), include=(), attention=True))
    assert type(attn).__name__ == "QuantMultiheadSelfAttention"
    with torch.no_grad():
        out = attn(x)
    assert sorted(attn.operand_quantizers) == ["mm0_a", "mm0_b", "mm1_a", "mm1_b"]
    torch.testing.assert_close(out, ref_quant, rtol=1e-4, atol=1e-5)
    assert (out - ref_float).abs().max() > 1e-3


# Quantizable layers of the small configuration (2 blocks): 18 conv3x3x3, 4 transposed, embed + final 1x1x1,
# in_proj / out_proj / linear1 / linear2 per block, one attention block each.
CENSUS = {"conv3x3x3": 18, "conv_transpose2x2x2": 4, "conv1x1x1": 2, "linear": 8, "attention": 2}


def test_quantized_w8a8_close_and_w4a4_adaptive_finite():
    """Random-init weights, calibrated on a batch that includes the test input (as tests/quant/test_api.py).

    W8A8 error is rounding only: one int8 tensor (weights per output channel, inputs per channel/token) adds
    ~0.4-0.7 % relative error (step 2·amax/255 with amax 3-4.5 σ, error step/√12), and the weights and inputs
    of ~20-25 layers on the path add up in quadrature (here W8 alone: 1.7 %, A8 alone: 3.1 %) to the
    measured 3.5-3.9 % (5 seeds) of the spatially varying logits; bound 8 %. W4A4 adaptive: 54-67 %.
    """
    errors, nets = quantized_errors(lambda: TransUNet3D(**SMALL), CENSUS)
    for net in nets.values():
        rows = {r.info.name: r for r in summarize(net).rows}
        assert rows["transformer_blocks.0.self_attn"].group == "attention"
        assert rows["transformer_blocks.0.self_attn.in_proj"].group == "linear"
        assert rows["transformer_blocks.0.self_attn.in_proj"].info.out_channels == 3 * 64
        assert "transformer_blocks.0.self_attn.in_proj_weight" in net.state_dict()
    assert errors["w8a8"] < 0.08, errors
    assert errors["w4a4"] > 5 * errors["w8a8"], errors


def test_quantized_state_dict_round_trip():
    x = torch.randn(1, 1, 32, 32, 32)
    recipe = QuantRecipe.from_precision("w8a8", granularity="per_channel", attention=True)
    torch.manual_seed(0)
    a = quantize(TransUNet3D(**SMALL).eval(), recipe)
    calibrate(a, [x])
    b = quantize(TransUNet3D(**SMALL).eval(), recipe)
    b.load_state_dict(a.state_dict(), strict=True)  # calibrated ranges included, reference key names kept
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_bad_sizes():
    with pytest.raises(ValueError, match="multiples of 16"):
        TransUNet3D(img_size=40)
    net = TransUNet3D(**SMALL).eval()
    with pytest.raises(ValueError, match=r"built for img_size=\[32, 32, 32\]"):
        net(torch.randn(1, 1, 48, 48, 48))


def test_hydra_config_instantiates():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["model=transunet", "dataset=btcv"])
    net = instantiate(cfg.model.net)
    assert isinstance(net, TransUNet3D) and cfg.model.name == "transunet"
    assert net.img_size == (96, 96, 96) and (net.in_channels, net.out_channels) == (1, 14)
    assert sum(p.numel() for p in net.parameters()) == 91_590_094
