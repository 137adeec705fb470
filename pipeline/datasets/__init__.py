"""The dataset concept, shared by preparation, extraction and collection: the layouts a dataset comes in (the
official Tiny ImageNet layout, ImageFolder with or without splits, a pack of tar shards: ``packs``), their one index (``dataset``, ``layouts``,
``indexing``), the stable val split (``holdout``), and reading images (``images``, and ``jpeg``: a JPEG's size and
reduced-decode scale, torch-free, shared with the torch-free runtimes).

Below the backbones and above ``pipeline.common``: common <- datasets <- backbones."""
