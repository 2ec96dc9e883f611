"""``python -m rlvr_optim``: the same as the ``rlvr-optim`` command."""

from .cli import main

raise SystemExit(main())
