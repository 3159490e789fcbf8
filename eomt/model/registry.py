"""Which of our functions or classes drives a timm object: looked up by the object's type, base classes too."""

from typing import TypeVar

T = TypeVar("T")


def lookup(registry: dict[type, T], obj: object, what: str) -> T:
    """registry[the first of type(obj)'s classes that is a key], or a one-line error naming obj's type."""
    for cls in type(obj).__mro__:
        if cls in registry:
            return registry[cls]
    supported = ", ".join(c.__name__ for c in registry)
    raise TypeError(f"EoMT cannot run {what} {type(obj).__name__}: supported are {supported}")
