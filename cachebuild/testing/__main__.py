"""``python -m cachebuild.testing KIND OUT_FOLDER``: save a tiny model (see :func:`cachebuild.testing.main`)."""

import sys

from cachebuild.testing.pipelines import main

sys.exit(main(sys.argv[1:]))
