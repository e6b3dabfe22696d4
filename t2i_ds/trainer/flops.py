"""Model FLOPs per token, peak FLOP/s per device, and MFU.

FLOPs per trained token (forward + backward = 3 x forward, no recomputation counted):

    6 * (N_matmul)              N_matmul = non-embedding parameters in matmuls + the output layer (V x dim)
  + 6 * n_layers * dim * S      causal attention scores and values: 2 matmuls x 2 FLOPs x S x dim per
                                layer forward, halved for the causal mask, x3 for fwd+bwd

Embedding lookups and norms are not counted (the usual convention, PaLM appendix B, with the
causal halving of attention). MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the device.
"""

from __future__ import annotations

import torch

from t2i_ds.model.args import ModelArgs

# Dense bf16 tensor-core peak, FLOP/s per device (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H100 SXM": 989.4e12,
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.5e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    d, L = args.dim, args.n_layers
    per_layer = 3 * d * d + d * d + 3 * d * args.ffn_hidden  # in_proj, out_proj, w12 + w3
    n_matmul = L * per_layer + args.vocab_size * d  # + output layer
    return 6.0 * n_matmul + 6.0 * L * d * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, None where unknown (CPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name:
        if "NVL" in name:
            return PEAK_BF16_FLOPS["H100 NVL"]
        return PEAK_BF16_FLOPS["H100 PCIe"] if "PCIe" in name else PEAK_BF16_FLOPS["H100 SXM"]
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None
