"""``python -m aegis_stream.lab``: fetch kernels, list them, run a command in one."""

import sys

from aegis_stream.lab.core import main

sys.exit(main())
