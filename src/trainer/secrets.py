"""Credentials in URIs (`postgresql://user:password@host/db`, `http://user:password@host`): used to connect, never
recorded or printed. Everything the trainer writes or prints that may hold a URI goes through `redact`; run data
keeps the URI without its password (`stored`), and a resume takes the password from the user's own command line
or from the environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, PGPASSWORD, ~/.pgpass), never from
run data (`with_credentials`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MASK = "***"
# scheme://user:password@  (the password may not hold `@`, `/` or whitespace unescaped: RFC 3986 percent-encodes them)
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s'\"]*):(?P<password>[^@/\s'\"]+)@")


def redact(text: str) -> str:
    """`text` with every URI's password replaced by ***."""
    return USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text) if "@" in text else text


def redact_tree(tree: Any) -> Any:
    """A plain container (a config) with every string value redacted."""
    if isinstance(tree, dict):
        return {k: redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return redact(tree) if isinstance(tree, str) else tree


def stored(uri: str) -> str:
    """The URI as run data keeps it: no password (PostgreSQL keeps its user: libpq then reads PGPASSWORD or
    ~/.pgpass); an HTTP server's user goes too (MLflow then sends MLFLOW_TRACKING_USERNAME/PASSWORD)."""

    def strip(m: re.Match) -> str:
        keep_user = m["scheme"].startswith(("postgres", "mysql", "mssql"))
        return f"{m['scheme']}{m['user']}@" if keep_user else m["scheme"]

    return USERINFO.sub(strip, uri)


def with_credentials(uri: str, own: str | None) -> str:
    """A run's stored URI, with the credentials of the user's own URI when that names the same store."""
    return own if own and stored(own) == stored(uri) else uri


def scrub_files(directory: Path) -> None:
    """Redact the files Hydra wrote for a job (`.hydra/config.yaml`, `overrides.yaml`, `hydra.yaml`) in place."""
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            text = path.read_text()
        except OSError:
            continue
        clean = redact(text)
        if clean != text:
            path.write_text(clean)
