"""Model FLOPs per token, peak FLOP/s per device, and MFU.

FLOPs per trained token (forward + backward = 3 x forward, no recomputation counted):

    6 * (N_matmul)              N_matmul = non-embedding parameters in matmuls + the output layer (V x dim)
  + 6 * n_layers * dim * S      causal attention scores and values: 2 matmuls x 2 FLOPs x S x dim per
                                layer forward, halved for the causal mask, x3 for fwd+bwd

Embedding lookups and norms are not counted (the usual convention, PaLM appendix B, with the
causal halving of attention). MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the device.

By modality. A position costs 6 * N_matmul plus its attention, 12 * n_layers * dim * (i + 1/2) at position
i (i + 1 keys with the diagonal counted half, which sums to the 6 * L * d * S per token above). Each position
is classed by its *target*: text, image, special, or pad (no target: the padding after `</doc>`, and the
`</doc>` position itself). Summing per class gives the compute spent on each modality, and the pad share is
the compute that trains nothing; padding sits at the end of the sequence, where attention is dearest, so its
share of FLOPs exceeds its share of positions.
"""

from __future__ import annotations

import torch

from t2i_ds.model.args import ModelArgs
from t2i_ds.vocab import IGNORE, MODALITY_NAMES

COMPUTE_CLASSES = (*MODALITY_NAMES, "pad")  # text, image, special (by target id range), pad (no target)

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


def matmul_params(args: ModelArgs) -> int:
    d, L = args.dim, args.n_layers
    per_layer = 3 * d * d + d * d + 3 * d * args.ffn_hidden  # in_proj, out_proj, w12 + w3
    return L * per_layer + args.vocab_size * d  # + output layer


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    return 6.0 * matmul_params(args) + 6.0 * args.n_layers * args.dim * seq_len


def modality_positions(targets: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """(B, S) targets -> (4, 2) float64 on the same device, per class (text, image, special, pad):
    [positions, sum over them of (position index + 1/2)]. Device ops only: no host sync."""
    S = targets.shape[1]
    pos = torch.arange(S, device=targets.device, dtype=torch.float64).add_(0.5).expand_as(targets)  # (B, S)
    cls = torch.full_like(targets, len(bounds))  # special: at or above the last bound
    for i in reversed(range(len(bounds))):
        cls = torch.where(targets < bounds[i], i, cls)  # text below bounds[0], image below bounds[1]
    cls = torch.where(targets == IGNORE, len(COMPUTE_CLASSES) - 1, cls)  # (B, S) in [0, 4)
    onehot = torch.nn.functional.one_hot(cls, len(COMPUTE_CLASSES)).to(torch.float64)  # (B, S, 4)
    return torch.stack([onehot.sum((0, 1)), (onehot * pos[..., None]).sum((0, 1))], dim=1)  # (4, 2)


def modality_flops(positions: list[list[float]], args: ModelArgs) -> dict[str, float]:
    """Model FLOPs per class from `modality_positions` sums: 6 N_matmul per position + 12 L d (i + 1/2)."""
    n_matmul = matmul_params(args)
    return {name: 6.0 * n_matmul * n + 12.0 * args.n_layers * args.dim * possum
            for name, (n, possum) in zip(COMPUTE_CLASSES, positions)}


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
