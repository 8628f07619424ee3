"""Command-line tools of the ``basicsr`` command beyond BasicSR's train / test.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (an exit status).
"""
