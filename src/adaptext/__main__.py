"""``python -m adaptext ...`` is the same as ``adaptext ...``."""

import sys

from adaptext.cli import main

sys.exit(main())
