"""``python -m capguard.server.evaluations run JOB_DIR``: one evaluation job (see child.py)."""

import sys

from capguard.server.evaluations.child import main

sys.exit(main())
