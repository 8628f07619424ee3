"""CPU performance machinery, apart from the archs (as BasicSR keeps ``basicsr/ops``).

* :mod:`.fused_cpu` - the fused decoder kernels (``fused_cpu.c``): compiled at first use, checked
  against torch, cached; each kernel says where it is available and the archs fall back to
  plain torch ops elsewhere (same numbers, slower).
* :mod:`.cpu_features` - what this CPU has (AMX, oneDNN's bf16 products), read in one place.
* :mod:`.allocator` - glibc allocator settings for training and inference.

Nothing here changes a result; switching all of it off (``CIISR_FUSED_CPU=off``) gives the same
outputs.
"""
