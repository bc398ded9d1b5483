"""Keep credentials out of the server's log: owner tokens, tickets and API keys are replaced by `***` in
every log record the API server process writes.

uvicorn logs each request's path with its query string (`?token=...`), vLLM logs its arguments
(`--api-key`), and an exception text may quote a header. Redacting in a log-record factory covers every
logger and handler (uvicorn's, vLLM's, ours, whatever logging config is loaded later), which a filter on
one logger would not: filters do not apply to records propagated from child loggers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "***"
# `token=`/`ticket=`/`api_key=`/`key=` values (query strings, `k=v` reprs), `'api_key': ['...']` in a
# logged dict, `livevlm.token.`/`livevlm.key.` websocket subprotocols and bearer credentials.
_PATTERNS = (
    re.compile(r"(?i)(\b(?:token|ticket|api[_-]?key|key)=)[^&\s\"',;)\]}]+"),
    re.compile(r"(?i)(['\"]api[_-]?key['\"]\s*:\s*\[?\s*['\"])[^'\"]+"),
    re.compile(r"(\blivevlm\.(?:token|key)\.)[^,\s\"']+"),
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',]+"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every credential (by pattern, and each literal secret) replaced by `***`."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class _Redactor:
    """A log-record factory: redacts the message and its string arguments (arguments stay in place, so
    formatters that read `record.args`, like uvicorn's access formatter, keep working)."""

    def __init__(self, previous, secrets: list[str]):
        self.previous = previous
        self.secrets = secrets

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self.secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(self._arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._arg(v) for k, v in record.args.items()}
        return record

    def _arg(self, value):
        if value is None or isinstance(value, (bool, int, float)):
            return value
        text = str(value)
        cleaned = redact(text, self.secrets)
        return value if cleaned == text else cleaned


def install(secrets: Iterable[str] = ()) -> None:
    """Redact every later log record of this process; `secrets` (the API keys) are redacted wherever they
    appear. Installing again only adds secrets."""
    factory = logging.getLogRecordFactory()
    values = [s for s in secrets if s]
    if isinstance(factory, _Redactor):
        factory.secrets.extend(v for v in values if v not in factory.secrets)
    else:
        logging.setLogRecordFactory(_Redactor(factory, values))
