"""Pass options declared with their type, default and allowed values, and checked before a pipeline runs.

A pass declares ``options = {name: Option(...)}``; :func:`check_options`
validates what the caller gave against every declaration of the pipeline
before any pass runs, so a bad value fails the same way for every pass: an
:class:`~graphopt.errors.UnknownOptionError` for a name nobody declares, an
:class:`~graphopt.errors.OptionError` for a value a declaration does not allow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphopt.errors import OptionError, UnknownOptionError

if TYPE_CHECKING:  # annotations only: pass_infra imports this module
    from graphopt.pass_infra import Pass


def _type_reason(kind: type, value: Any) -> str | None:
    """Why ``value`` is not of the option type ``kind`` (None: it is)."""
    if kind is bool:
        return None if isinstance(value, bool) else "give True or False"
    if kind is int:
        whole = (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and value.is_integer())
        return None if whole else "give a whole number"
    if kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number else "give a number"
    return None if isinstance(value, kind) else f"give a {kind.__name__}"


@dataclass(frozen=True)
class Option:
    """The declaration of one pass option: its type, default, allowed values and what it does.

    ``type``: ``bool``, ``int``, ``float`` or ``str`` (None: any value).
    ``choices``: the allowed values (None: any of the type). ``check``: a
    further test returning why a value is not allowed (None: it is).
    ``default``: the value when the option is not given (None where the pass
    decides, e.g. "on for auto"; the description says how). ``None`` is always
    accepted: it means "not given".

    >>> Option("rows per block", int).validate("block_q", "eight")
    Traceback (most recent call last):
    ...
    graphopt.errors.OptionError: block_q='eight': give a whole number (allowed: int)
    """

    description: str
    type: type | None = None
    default: Any = None
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    def allowed(self) -> str:
        """The allowed values, for messages and ``graphopt passes``."""
        if self.choices is not None:
            return ", ".join(repr(c) for c in self.choices)
        return self.type.__name__ if self.type is not None else "any value"

    def validate(self, name: str, value: Any) -> None:
        """Raise :class:`~graphopt.errors.OptionError` unless ``value`` is allowed for option ``name``."""
        if value is None:
            return
        reason = _type_reason(self.type, value) if self.type is not None else None
        if reason is None and self.choices is not None and value not in self.choices:
            reason = f"choose one of {self.allowed()}"
        if reason is None and self.check is not None:
            reason = self.check(value)
        if reason is not None:
            raise OptionError(name, value, reason, self.allowed())

    def __str__(self) -> str:
        return self.description


def declared_options(pipeline: Sequence[Pass]) -> dict[str, list[Option]]:
    """Every option the passes of ``pipeline`` declare, each with its declarations (one per pass)."""
    known: dict[str, list[Option]] = {}
    for p in pipeline:
        for name, option in p.options.items():
            known.setdefault(name, []).append(option)
    return known


def check_options(pipeline: Sequence[Pass], options: Mapping[str, Any]) -> None:
    """Validate ``options`` against ``pipeline``'s declarations before any pass runs.

    Raises :class:`~graphopt.errors.UnknownOptionError` for a name no pass
    declares and :class:`~graphopt.errors.OptionError` for a value a
    declaration does not allow -- the same way for every pass.
    """
    known = declared_options(pipeline)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UnknownOptionError(unknown, sorted(known))
    for name, value in options.items():
        for option in known[name]:
            option.validate(name, value)
