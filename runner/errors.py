"""The one exception type the CLI turns into a readable message and exit status 2.

Raise `UserError` (or a subclass) for anything the user can fix: a bad recipe, a missing file, an option
that needs a package that is not installed. Its message must name the thing and the fix. Everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says what and how."""
