"""Throwaway x509 certificates for the TLS tests, made with GnuTLS' certtool.

Directories are laid out the way QEMU and libnbd read them (ca-cert.pem,
server-cert.pem/server-key.pem or client-cert.pem/client-key.pem). ECDSA keys,
because they take milliseconds to generate.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CA_TEMPLATE = """cn = "{cn}"
ca
cert_signing_key
expiration_days = 2
"""
SERVER_TEMPLATE = """cn = "localhost"
dns_name = "localhost"
ip_address = "127.0.0.1"
tls_www_server
encryption_key
signing_key
expiration_days = 2
"""
CLIENT_TEMPLATE = """cn = "{cn}"
tls_www_client
encryption_key
signing_key
expiration_days = 2
"""


@dataclass
class Pki:
    """Everything a TLS test needs.

    ``server``: what Driver(tls_x509_cert_dir=...) points at. ``client``: a
    client with a certificate from the same CA (CN=client). ``no_cert``: a client
    that trusts the server but has no certificate. ``rogue``: a client whose
    certificate another CA signed. ``intruder``: a client with a certificate from
    the same CA under another name (CN=intruder), for allow-lists.
    """

    server: Path
    client: Path
    no_cert: Path
    rogue: Path
    intruder: Path


def _certtool(*args: str, cwd: Path) -> None:
    subprocess.run(["certtool", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key(work: Path, name: str) -> Path:
    path = work / f"{name}-key.pem"
    _certtool("--generate-privkey", "--key-type", "ecdsa", "--outfile", str(path), cwd=work)
    return path


def _template(work: Path, name: str, text: str) -> Path:
    path = work / f"{name}.tmpl"
    path.write_text(text)
    return path


def _ca(work: Path, name: str) -> tuple[Path, Path]:
    key = _key(work, name)
    cert = work / f"{name}-cert.pem"
    tmpl = _template(work, name, CA_TEMPLATE.format(cn=f"pyvirtbackup test {name}"))
    _certtool(
        "--generate-self-signed",
        "--load-privkey", str(key),
        "--template", str(tmpl),
        "--outfile", str(cert),
        cwd=work,
    )  # fmt: skip
    return cert, key


def _signed(work: Path, name: str, template: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key = _key(work, name)
    cert = work / f"{name}-cert.pem"
    tmpl = _template(work, name, template)
    _certtool(
        "--generate-certificate",
        "--load-privkey", str(key),
        "--load-ca-certificate", str(ca[0]),
        "--load-ca-privkey", str(ca[1]),
        "--template", str(tmpl),
        "--outfile", str(cert),
        cwd=work,
    )  # fmt: skip
    return cert, key


def _dir(root: Path, name: str, files: dict[str, Path]) -> Path:
    d = root / name
    d.mkdir()
    for target, source in files.items():
        shutil.copy(source, d / target)
    return d


def make_pki(root: Path) -> Pki:
    work = root / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "ca")
    other_ca = _ca(work, "other-ca")
    server = _signed(work, "server", SERVER_TEMPLATE, ca)
    client = _signed(work, "client", CLIENT_TEMPLATE.format(cn="client"), ca)
    rogue = _signed(work, "rogue", CLIENT_TEMPLATE.format(cn="rogue"), other_ca)
    intruder = _signed(work, "intruder", CLIENT_TEMPLATE.format(cn="intruder"), ca)
    return Pki(
        server=_dir(
            root,
            "server",
            {"ca-cert.pem": ca[0], "server-cert.pem": server[0], "server-key.pem": server[1]},
        ),
        client=_dir(
            root,
            "client",
            {"ca-cert.pem": ca[0], "client-cert.pem": client[0], "client-key.pem": client[1]},
        ),
        no_cert=_dir(root, "no-cert", {"ca-cert.pem": ca[0]}),
        rogue=_dir(
            root,
            "rogue",
            {"ca-cert.pem": ca[0], "client-cert.pem": rogue[0], "client-key.pem": rogue[1]},
        ),
        intruder=_dir(
            root,
            "intruder",
            {"ca-cert.pem": ca[0], "client-cert.pem": intruder[0], "client-key.pem": intruder[1]},
        ),
    )
