"""Tests against the real SAELens and llamascopium packages (make test-interop)."""
