"""The backbone's room: every stage gets its network here, and nothing outside knows one backbone from another.

- ``catalog``: torch-free. Which family serves a name, the catalog entries (AlexNet: its DeCAF layer names, its
  cut after fc7, its preprocessing), and the facts a rerun needs without torch: default layers, preprocessing,
  hub file, batch size, cache folder, the order and main layer of a file's layers, and the layer specs a cache or
  a checkpoint recorded.
- ``backbone``: ``Backbone``, ``open_backbone`` (a new cache) and ``rebuild`` (from a record, fingerprint checked):
  the only ways a stage gets a network. ``backbone_listing`` and ``layer_listing`` for --list-backbones and
  --list-layers.
- ``torchvision_family``: the torchvision family (its registry, weights, preprocessing and graph cutting).
  ``timm_family`` (``timm:ARCH[.TAG]``) and ``open_clip_family`` (``open_clip:ARCH[/TAG]``) are modules beside it,
  registered in ``catalog.FAMILIES``, sharing ``zoo`` (weights files, widths, batch sizes); they need the zoo extra.
- ``precision``: the compute precision, all of it: names, auto's rules, timing and fidelity guard, the compute
  dtype and math flags, and placing a backbone on its device.
- ``weights``: weights specs and the stamp of their file (torch-free), and reading a weights file.

Importing this package imports no torch; ``backbone``, the family modules and the timing in ``precision``
import it when used.
"""
