"""Triton kernels (imported as `t2i_kernels`). Each file is a trio: kernel, `*_ref` in torch, autograd op."""
