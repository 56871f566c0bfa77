"""`python -m probssl …` is the `probssl` command (used by `probssl bench --jobs N` for its workers)."""

import sys

from probssl.cli import main

sys.exit(main())
