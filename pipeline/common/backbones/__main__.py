"""``python -m pipeline.common.backbones [NAME]``: the catalogue's command line (as before the package existed)."""
from pipeline.common.backbones.catalog import main

raise SystemExit(main())
