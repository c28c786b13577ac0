"""Server logging: plain text or one JSON object per line, with request ids.

    configure_logging("json")     # recserve serve --log-format json
    log.info("loaded", extra={"model": "retail", "version": 3})

A JSON line holds ts (ISO 8601, UTC), level, logger, message, any ``extra`` fields
(request_id, model, version, code, ...) and the traceback for exceptions. The request id
of a failed call is in its gRPC error message, in its ``x-request-id`` trailing metadata
and in the log line, so a client's report leads to the server's log; a caller may send its
own ``x-request-id`` metadata to have it used instead.
"""

from __future__ import annotations

import datetime
import json
import logging

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                   timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
