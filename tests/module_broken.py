"""A module file that fails at import (for the start-up error test)."""

raise ImportError("this module cannot be imported: a missing dependency")
