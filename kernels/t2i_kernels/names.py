"""Names the configs check against, importable without torch or Triton: the train command reports a bad config in a
fraction of a second, before those load (t2i_ds.model.args)."""

LOSS_IMPLS = ("auto", "torch", "chunked", "triton")  # t2i_kernels.cross_entropy's dispatcher: fused_linear_ce(impl=)
