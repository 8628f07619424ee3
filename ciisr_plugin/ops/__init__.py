"""CPU performance machinery, apart from the archs (as BasicSR keeps ``basicsr/ops``).

* :mod:`.query_decode` - the decoders' per-query ops (``mlp_decode``, ``basis_decode``): what the
  archs call; each runs its fused kernel where one applies and plain torch everywhere else.
* :mod:`.fused_cpu` - those fused kernels (``fused_cpu.c``): compiled at first use, checked
  against torch, cached.
* :mod:`.cpu_linear` - dense layers routed to oneDNN on CPU (training and inference).
* :mod:`.cpu_features` - what this CPU has (AMX, oneDNN's bf16 products), read in one place.
* :mod:`.allocator` - glibc allocator settings for training and inference.

Nothing here changes a result; switching all of it off (``CIISR_FUSED_CPU=off``) gives the same
outputs.
"""
