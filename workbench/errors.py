"""Errors a user can cause. The CLI prints their message on one line and exits 2."""


class WorkbenchError(Exception):
    """Base class: a one-line message naming the bad value and what is allowed."""


class PolicyError(WorkbenchError):
    """A policy (or its JSON file, or a CLI shorthand) is malformed or names something unknown."""


class ModelError(WorkbenchError):
    """A model name or path cannot be resolved or loaded."""


class InputError(WorkbenchError):
    """A request argument (prompt, token count, corpus path, ...) is out of range."""
