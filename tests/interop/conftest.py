"""Tests against the real SAELens and llamascopium packages (``make test-interop``, its own venv).

They run only with ATTNSPACE_INTEROP=1, which ``make test-interop`` sets; there a missing
package is an import error, never a skip. The main suite (``make test``) does not collect them.
"""

import os

if os.environ.get("ATTNSPACE_INTEROP") != "1":
    collect_ignore_glob = ["test_*.py"]
