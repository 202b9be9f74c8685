"""The NBD server's x509 files, checked the way the strictest QEMU we support checks them.

QEMU reads the certificates only at ``object-add``, after a begin has made scratch
images, and a QEMU upgrade can start refusing what an older one accepted: 7.2 takes
a server certificate whose key usage lacks key encipherment, 10.0 refuses it. A
backup that worked yesterday would then fail at 3 a.m. after a package update. So
every rule any supported QEMU applies at ``object-add`` is applied here, before
anything reaches QEMU, on every QEMU, and the message names the file, the problem
and the fix.

Rules (QEMU's crypto/tlscredsx509.c, observed on 7.2 and 10.0 here): every
certificate inside its validity period; CA certificates marked CA in their basic
constraints and, where key usage is given, allowed to sign certificates; the server
certificate not a CA, with key usage (where given) allowing digital signature and
key encipherment, issued by the CA; the key matching the certificate. Nothing
more: refusing what every QEMU takes (a revoked certificate, an extended key usage
for clients only; neither is refused by QEMU at object-add nor by libnbd's
clients) would break set-ups that work.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from ..errors import ErrorDomain, ErrorNumber, VirError

CERT_HINT = (
    "see README, 'TLS certificates', for a recipe whose certificates every supported QEMU accepts"
)


def tls_error(message: str) -> VirError:
    """libvirt reports a backup TLS directory it cannot use as a configuration error
    (VIR_ERR_CONF_SYNTAX, virQEMUDriverConfigValidate); so do we, for its content too."""
    return VirError(ErrorNumber.CONF_SYNTAX, ErrorDomain.QEMU, message)


def _problem(path: str, what: str) -> VirError:
    return tls_error(f"backup TLS file '{path}': {what}; {CERT_HINT}")


def _load_certificates(path: str) -> list[Any]:
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read(1 << 20)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise _problem(path, f"not a PEM certificate ({exc})") from None
    return certs


def _extension(cert: Any, cls: type) -> Any:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _check_times(cert: Any, path: str, role: str, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise _problem(
            path, f"the {role} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now > cert.not_valid_after_utc:
        raise _problem(path, f"the {role} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _check_ca(cert: Any, path: str) -> None:
    from cryptography import x509

    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise _problem(
            path,
            f"certificate '{_subject(cert)}' is not marked as a CA in its basic constraints",
        )
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise _problem(
            path, f"CA certificate '{_subject(cert)}' has a key usage that does not permit "
            "certificate signing",
        )  # fmt: skip


def _check_server(cert: Any, path: str) -> None:
    from cryptography import x509

    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise _problem(path, "the server certificate is a CA certificate; QEMU needs a server one")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None:
        if not usage.digital_signature:
            raise _problem(
                path, "the server certificate's key usage does not permit digital signature"
            )
        if not usage.key_encipherment:
            raise _problem(
                path,
                "the server certificate's key usage does not permit key encipherment; "
                "QEMU 10.0 refuses such a certificate (7.2 still accepted it), so it would "
                "break on an upgrade",
            )


def _subject(cert: Any) -> str:
    return str(cert.subject.rfc4514_string())


def _issued_by(cert: Any, issuer: Any) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_chain(server: Any, intermediates: list[Any], cas: list[Any], path: str) -> None:
    """The server certificate (and any certificates after it in its file) lead to a CA
    of ca-cert.pem: QEMU verifies its own certificate against the CA before serving."""
    current, pool = server, list(intermediates)
    for _ in range(len(intermediates) + 1):
        if any(_issued_by(current, ca) for ca in cas):
            return
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            break
        pool.remove(parent)
        current = parent
    raise _problem(
        path,
        f"the server certificate '{_subject(server)}' was not issued by the CA in "
        "ca-cert.pem (signed by another CA?)",
    )


def _check_key(server: Any, cert_path: str, key_path: str) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    with open(key_path, "rb") as f:
        data = f.read(1 << 20)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise _problem(
            key_path, "the private key is encrypted; QEMU needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _problem(key_path, f"not a PEM private key ({exc})") from None

    def spki(public: Any) -> bytes:
        return bytes(
            public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    if spki(key.public_key()) != spki(server.public_key()):
        raise _problem(key_path, f"the private key does not match the certificate in {cert_path}")


def check_server_files(directory: str, now: datetime.datetime | None = None) -> None:
    """Refuse server credentials that any supported QEMU would refuse at object-add.

    The files are known to exist and be readable (``nbd.check_tls_dir``).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    ca_path = os.path.join(directory, "ca-cert.pem")
    cert_path = os.path.join(directory, "server-cert.pem")
    key_path = os.path.join(directory, "server-key.pem")
    cas = _load_certificates(ca_path)
    for ca in cas:
        _check_times(ca, ca_path, f"CA certificate '{_subject(ca)}'", now)
        _check_ca(ca, ca_path)
    server, *intermediates = _load_certificates(cert_path)
    _check_times(server, cert_path, "server certificate", now)
    _check_server(server, cert_path)
    for cert in intermediates:
        _check_times(cert, cert_path, f"certificate '{_subject(cert)}'", now)
        _check_ca(cert, cert_path)
    _check_chain(server, intermediates, cas, cert_path)
    _check_key(server, cert_path, key_path)
