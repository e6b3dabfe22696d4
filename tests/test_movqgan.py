"""MoVQGAN wrapper vs diffusers' VQModel, on a tiny randomly initialised MoVQ-architecture model."""

import re

import pytest
import torch

from t2i_ds.data.tokenizers import ImageTokenizer
from t2i_ds.data.movqgan import MOVQGAN_CONFIGS, MoVQGANTokenizer, convert_sber_movqgan

IMAGE = 16  # tiny config: 4x downsampling -> a 4x4 grid


def make_tiny_vqmodel(seed: int = 0):
    from diffusers import VQModel

    torch.manual_seed(seed)
    model = VQModel(**MOVQGAN_CONFIGS["tiny"])
    model.quantize.embedding.weight.data.normal_()  # spread codes (diffusers' init is ~U(+-1/n))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("movq")
    make_tiny_vqmodel().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return MoVQGANTokenizer.load(tiny_dir, image_size=IMAGE, batch_size=3, device="cpu")


def images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, IMAGE, IMAGE, generator=g) * 2 - 1


def test_implements_protocol_and_describes_itself(tok, tiny_dir):
    assert isinstance(tok, ImageTokenizer)
    assert tok.grid == (4, 4) and tok.tokens_per_image == 16 and tok.codebook_size == 64
    assert tok.describe() == {"name": "movqgan", "path": str(tiny_dir), "codebook_size": 64, "grid": [4, 4], "image_size": 16}


def test_encode_is_nearest_codebook_entry_in_raster_order(tok):
    x = images(5)
    codes = tok.encode(x)
    assert codes.shape == (5, 16) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 64
    with torch.no_grad():  # independent reference: squared distances to every code, by hand
        h = tok.model.encoder(x)
        h = tok.model.quant_conv(h)  # (B, D, 4, 4)
        z = h.permute(0, 2, 3, 1).reshape(5, 16, 1, -1)  # (B, row*col, 1, D)
        dist = ((z - tok.model.quantize.embedding.weight) ** 2).sum(-1)  # (B, 16, 64)
    assert torch.equal(codes, dist.argmin(-1))
    assert len(codes.unique()) > 4  # a real spread of codes, not a constant


def test_decode_equals_diffusers_forward(tok):
    x = images(4)
    with torch.no_grad():
        ref = tok.model(x).sample.clamp(-1, 1)  # diffusers: encode -> quantize -> decode
    out = tok.decode(tok.encode(x))
    assert out.shape == (4, 3, IMAGE, IMAGE) and out.dtype == torch.float32
    print("max |wrapper - diffusers|:", (out - ref).abs().max().item())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_batch_of_four_equals_four_singles(tok):
    x = images(4, seed=7)
    codes = tok.encode(x)  # batch_size=3: chunks of 3 + 1
    singles = torch.cat([tok.encode(x[i : i + 1]) for i in range(4)])
    assert torch.equal(codes, singles)
    torch.testing.assert_close(tok.decode(codes), torch.cat([tok.decode(codes[i : i + 1]) for i in range(4)]), atol=1e-5, rtol=1e-5)


def test_input_checks(tok, tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        tok.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 16), 64))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        MoVQGANTokenizer.load(tmp_path)


def test_rejects_group_norm_vqmodel(tmp_path):
    from diffusers import VQModel

    VQModel(**{**MOVQGAN_CONFIGS["tiny"], "norm_type": "group"}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="spatial"):
        MoVQGANTokenizer.load(tmp_path, image_size=IMAGE)


def test_67m_config_has_67m_parameters():
    from diffusers import VQModel

    n = sum(p.numel() for p in VQModel(**MOVQGAN_CONFIGS["67M"]).parameters())
    assert 67e6 < n < 68.5e6, n


# ---- converter -----------------------------------------------------------------------------------
def sber_name(key: str, n_up: int) -> str:
    """diffusers VQModel key -> the original SBER MoVQGAN key (written independently of the converter)."""
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.", key)
    for a, b in [
        (r"down_blocks\.(\d+)\.", r"down.\1."),
        (r"\.resnets\.(\d+)\.", r".block.\1."),
        (r"\.downsamplers\.0\.", ".downsample."),
        (r"\.upsamplers\.0\.", ".upsample."),
        (r"\.attentions\.(\d+)\.", r".attn.\1."),
        (r"mid_block\.block\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attn\.0\.", "mid.attn_1."),
        (r"conv_norm_out\.", "norm_out."),
        (r"conv_shortcut", "nin_shortcut"),
        (r"\.(group_norm|spatial_norm)\.", ".norm."),
        (r"\.to_out\.0\.", ".proj_out."),
        (r"\.to_([qkv])\.", r".\1."),
    ]:
        key = re.sub(a, b, key)
    return key


def test_convert_sber_round_trip():
    model = make_tiny_vqmodel(seed=3)
    ref = model.state_dict()
    n_up = len(model.decoder.up_blocks)
    sber = {}
    for k, v in ref.items():
        name = sber_name(k, n_up)
        is_attn_linear = re.search(r"\.attn(\.\d+|_1)\.(q|k|v|proj_out)\.weight$", name)
        sber[name] = v[:, :, None, None] if is_attn_linear else v  # SBER attention projections are 1x1 convs
    assert len(sber) == len(ref)
    ckpt = {"state_dict": {**sber, "loss.discriminator.main.0.weight": torch.zeros(1)}}  # Lightning layout
    out = convert_sber_movqgan(ckpt)
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    from diffusers import VQModel

    fresh = VQModel(**MOVQGAN_CONFIGS["tiny"])
    fresh.load_state_dict(out, strict=True)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).sample, model(x).sample)
