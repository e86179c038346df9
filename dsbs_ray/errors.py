"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong counts).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass


class RunFailure(Exception):
    """A run stopped by something outside the user's input (a teacher engine that keeps dying, an
    endpoint that stopped answering): one line naming the cause, exit code 1, what finished kept."""


def build(model_cls, where: str = "", **fields):
    """model_cls(**fields) for a pydantic model; a validation error becomes one UserError line naming
    the field (and `where`, e.g. the config file), never a multi-line pydantic report."""
    from pydantic import ValidationError

    try:
        return model_cls(**fields)
    except ValidationError as e:
        # a union (teacher: released | {model: ...}) reports each branch: name the one the input meant
        errors = e.errors()
        branch = ("literal_error", "model_type", "dict_type", "model_attributes_type")
        err = next((x for x in errors if x["type"] not in branch), errors[0])
        loc = [p for p in err["loc"] if not (isinstance(p, str) and (p[:1].isupper() or "[" in p))]
        field = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            shown = err["type"] != "missing" and not isinstance(err["input"], dict)
            msg = err["msg"].removeprefix("Value error, ") + (f" (got {err['input']!r})" if shown else "")
        raise UserError(f"{where}{field}: {msg}" if field else f"{where}{msg}") from None
