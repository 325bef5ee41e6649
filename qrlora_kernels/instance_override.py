"""A callable that stands in for one method of one object (a module's ``forward``, a model's ``generate``) while
an ``adapter_batch`` or ``disable_adapters`` block runs.

It is set as an instance attribute for the length of the block. A copy of the object made meanwhile
(``copy.deepcopy``, ``pickle``, ``torch.save``, a spawned process) gets the method the object had before the block,
bound to the copy: the block belongs to the original, and its state (closures, adapter ids) neither belongs to the
copy nor pickles. A shallow ``copy.copy`` shares the override, which calls the method it replaced once the block
is over.
"""
from __future__ import annotations


def _the(value):
    return value


def _class_method_of(owner, attr: str):
    # (Touches no instance state: pickle calls this before the copy's attributes are set.)
    return getattr(type(owner), attr).__get__(owner)


class InstanceOverride:
    """Subclasses define ``__call__``; ``self.original`` is the method it stands in for."""

    def __init__(self, owner, attr: str) -> None:
        self.owner, self.attr = owner, attr
        self.previous = owner.__dict__.get(attr)  # an instance's own method (accelerate's hooks set a forward)
        self.original = getattr(owner, attr)

    def install(self) -> None:
        setattr(self.owner, self.attr, self)

    def remove(self) -> None:
        if self.previous is None:
            delattr(self.owner, self.attr)
        else:
            setattr(self.owner, self.attr, self.previous)

    def __reduce__(self):
        if self.previous is not None:
            return _the, (self.previous,)
        return _class_method_of, (self.owner, self.attr)
