"""The one error type users see: bad input, reported as one line naming the file and the problem."""


class UserError(ValueError):
    """Raised for anything the user can fix (a file, a config field, a checkpoint); never for our own bugs."""
