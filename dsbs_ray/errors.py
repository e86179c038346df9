"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong counts).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass


def build(model_cls, where: str = "", **fields):
    """model_cls(**fields) for a pydantic model; a validation error becomes one UserError line naming
    the field (and `where`, e.g. the config file), never a multi-line pydantic report."""
    from pydantic import ValidationError

    try:
        return model_cls(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            shown = err["type"] != "missing" and not isinstance(err["input"], dict)
            msg = err["msg"] + (f" (got {err['input']!r})" if shown else "")
        raise UserError(f"{where}{field}: {msg}") from None
