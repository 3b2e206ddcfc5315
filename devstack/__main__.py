"""`python -m devstack up|down`, the same as `python -m devstack.localstack up|down`."""

import sys

from .localstack import main

sys.exit(main())
