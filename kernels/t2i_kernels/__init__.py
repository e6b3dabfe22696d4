"""Triton kernels (imported as `t2i_kernels`). Each file is a trio: Triton kernel(s), a pure-torch `*_ref`, and the autograd op (a torch.library custom op, so torch.compile traces it)."""
