"""The kinds of error graphopt raises on purpose, so callers dispatch on type, never on message text.

::

    GraphoptError            exit_code 2; abort_pipeline: the pass manager lets it through
    └─ BadInput              the user's input is wrong; the message says what to do next
       ├─ OptionError        a pass option graphopt cannot use (unknown name: also a TypeError;
       │                     bad value: also a ValueError)
       ├─ SpecError          (graphopt.specs) a model spec that cannot be read or built
       ├─ UsageError         (graphopt.commands.common) a bad command line
       ├─ NoOnnxForm         (graphopt.onnx.result, also an OnnxExportError) a construct ONNX cannot
       │                     express (complex tensors): names the node; the original does not export either
       ├─ VerifyInputsError  a ``verify_inputs=`` value that is not input sets like the example's
       └─ BudgetError        (graphopt.passes.blocked) a memory budget no plan meets

The CLI prints a :class:`GraphoptError`'s message as one line and exits with
its ``exit_code``. Every one of them has ``abort_pipeline = True``: the
:class:`~graphopt.pass_infra.PassManager` does not roll a pass back for it
(the user must act) but lets it reach the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class GraphoptError(Exception):
    """Base of the errors graphopt raises for its callers to act on."""

    #: the CLI's exit status for this error
    exit_code: ClassVar[int] = 2
    #: the pass manager lets it through instead of rolling the pass back
    abort_pipeline: ClassVar[bool] = True


class BadInput(GraphoptError):
    """The user's input (a spec, an option, a budget, a command line) cannot be used as given."""


class OptionError(BadInput, ValueError):
    """A pass option with a value no pass in the pipeline accepts.

    The message names the option, the bad value and what is allowed.
    """

    def __init__(self, name: str, value: Any, reason: str, allowed: str | None = None) -> None:
        self.name, self.value, self.reason, self.allowed = name, value, reason, allowed
        message = f"{name}={value!r}: {reason}"
        if allowed and allowed not in reason:
            message += f" (allowed: {allowed})"
        super().__init__(message)


class VerifyInputsError(BadInput, ValueError):
    """``verify_inputs=`` that is not a list of ``(args, kwargs)`` pairs like the example inputs, or a callable
    returning one (:func:`graphopt.fresh_inputs.user_input_sets`)."""


class UnknownOptionError(OptionError, TypeError):
    """Options no pass in the pipeline declares (a ``TypeError``, like an unknown keyword argument)."""

    def __init__(self, names: Sequence[str], known: Sequence[str]) -> None:
        self.names, self.known = list(names), list(known)
        BadInput.__init__(self, f"optimize() got unknown option(s) {self.names}; "
                                f"options the passes understand: {self.known or 'none'}")
        self.name, self.value, self.reason, self.allowed = self.names[0], None, "unknown option", ", ".join(known)
