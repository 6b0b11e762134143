"""Secrets and TLS: API tokens, passwords from the environment, SSL contexts for DICOM and HTTPS.

Secrets come only from the environment or from files that no other user can read; a file with
looser permissions is refused with a message that says how to fix it.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from pathlib import Path

from dicomnode.config import ApiSection, ClientTls, ConfigError, NodeConfig, RestDestination, TlsSection

TOKEN_ENV = "DICOMNODE_API_TOKEN"
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def check_private(path: Path, what: str) -> None:
    """A secret file must exist and be readable by its owner only."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what} {path} can be read by other users (mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`")


def load_tokens(api: ApiSection, environ: dict[str, str] | None = None) -> dict[str, str]:
    """API tokens and who holds them: `user token` lines in `api.token_file` (a bare token is
    `admin`'s), and DICOMNODE_API_TOKEN from the environment (user `env`)."""
    environ = os.environ if environ is None else environ
    tokens: dict[str, str] = {}
    if api.token_file is not None:
        check_private(api.token_file, "api.token_file")
        for n, line in enumerate(Path(api.token_file).read_text().splitlines(), 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 2:
                raise ConfigError(f"api.token_file {api.token_file} line {n}: expected `user token` or a bare token")
            user, token = (parts[0], parts[1]) if len(parts) == 2 else ("admin", parts[0])
            if len(token) < 16:
                raise ConfigError(f"api.token_file {api.token_file} line {n}: the token of {user!r} is shorter than 16 characters")
            tokens[token] = user
    if environ.get(TOKEN_ENV):
        tokens[environ[TOKEN_ENV]] = "env"
    return tokens


def resolve_secret(value: str | None, where: str, environ: dict[str, str] | None = None) -> str | None:
    """`${NAME}` is read from the environment variable NAME; anything else is used as written."""
    if value is None:
        return None
    m = _ENV_REF.match(value)
    if not m:
        return value
    environ = os.environ if environ is None else environ
    if m.group(1) not in environ:
        raise ConfigError(f"{where} refers to the environment variable {m.group(1)}, which is not set")
    return environ[m.group(1)]


def check_written_secrets(cfg: NodeConfig, path: Path) -> None:
    """A password written into the configuration file is accepted only if no other user can read the file."""
    for name, dest in cfg.destinations.items():
        if isinstance(dest, RestDestination) and dest.password and not _ENV_REF.match(dest.password):
            check_private(path, f"destination {name!r} has its password written in the configuration (write it as "
                                "${NAME} and set NAME in the environment, or protect the file):")


def dicom_client_context(tls: ClientTls, where: str) -> ssl.SSLContext:
    """Client-side TLS towards a destination: its certificate is verified (host name included)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certfile is not None:
        if tls.keyfile is None:
            raise ConfigError(f"{where}.tls: a certfile needs its keyfile")
        check_private(tls.keyfile, f"{where}.tls.keyfile")
        ctx.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    return ctx


def dicom_server_context(tls: TlsSection) -> ssl.SSLContext:
    """Server-side TLS for the DICOM listener (TLS 1.2 or later); with `ca_file`, mutual TLS."""
    check_private(tls.keyfile, "node.tls.keyfile")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.certfile), str(tls.keyfile))
        if tls.ca_file is not None:
            ctx.load_verify_locations(str(tls.ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"node.tls: cannot load the certificate, key or CA file ({e})") from None
    return ctx
