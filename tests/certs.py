"""x509 certificates for the TLS tests.

The good ones come from the recipe users are given, ``examples/tls_certs.sh``, so
that the recipe is what the tests prove works on every QEMU. The bad ones are made
here with GnuTLS' certtool, one flaw each, to check that the TLS check refuses what
any supported QEMU refuses.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "tls_certs.sh"


@dataclass
class Pki:
    """Everything a TLS test needs.

    ``server``: what Driver(tls_x509_cert_dir=...) points at. ``client``: a
    client with a certificate from the same CA (CN=client). ``no_cert``: a client
    that trusts the server but has no certificate. ``rogue``: a client whose
    certificate another CA signed. ``intruder``: a client with a certificate from
    the same CA under another name (CN=intruder), for allow-lists. ``ca``: the
    CA's certificate and key, to sign more.
    """

    server: Path
    client: Path
    no_cert: Path
    rogue: Path
    intruder: Path
    ca: Path


def _recipe(out: Path, client: str) -> None:
    subprocess.run(
        [str(RECIPE), str(out), "localhost", client, "2"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def make_pki(root: Path) -> Pki:
    _recipe(root / "main", "client")
    _recipe(root / "other", "rogue")
    no_cert = root / "no-cert"
    no_cert.mkdir()
    shutil.copy(root / "main" / "ca" / "ca-cert.pem", no_cert / "ca-cert.pem")
    # the rogue client trusts our server's CA, but its own certificate is another CA's
    shutil.copy(root / "main" / "ca" / "ca-cert.pem", root / "other" / "client" / "ca-cert.pem")
    ca = root / "main" / "ca"
    return Pki(
        server=root / "main" / "server",
        client=root / "main" / "client",
        no_cert=no_cert,
        rogue=root / "other" / "client",
        intruder=_intruder(root / "intruder", ca),
        ca=ca,
    )


def _intruder(out: Path, ca: Path) -> Path:
    """A client our CA signed, under a name no allow-list of the tests admits."""
    out.mkdir()
    key = _key(out / "client-key.pem")
    (out / "client.tmpl").write_text(INTRUDER)
    _certtool("--generate-certificate", "--load-privkey", str(key),
              "--load-ca-certificate", str(ca / "ca-cert.pem"),
              "--load-ca-privkey", str(ca / "ca-key.pem"),
              "--template", str(out / "client.tmpl"), "--outfile", str(out / "client-cert.pem"),
              cwd=out)  # fmt: skip
    (out / "client.tmpl").unlink()
    shutil.copy(ca / "ca-cert.pem", out / "ca-cert.pem")
    return out


# --------------------------------------------------------------- one flaw each

GOOD_SERVER = """cn = "localhost"
dns_name = "localhost"
tls_www_server
signing_key
encryption_key
expiration_days = 2
"""
GOOD_CA = """cn = "flawed test CA"
ca
cert_signing_key
crl_signing_key
expiration_days = 2
"""
INTRUDER = """cn = "intruder"
tls_www_client
signing_key
encryption_key
expiration_days = 2
"""
PAST = 'activation_date = "2019-01-01 00:00:00"\nexpiration_date = "2020-01-01 00:00:00"\n'
FUTURE = 'activation_date = "2035-01-01 00:00:00"\nexpiration_date = "2036-01-01 00:00:00"\n'


def _without(template: str, *lines: str) -> str:
    return "".join(line + "\n" for line in template.splitlines() if line not in lines)


def _certtool(*args: str, cwd: Path) -> None:
    subprocess.run(["certtool", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key(path: Path, key_type: str = "rsa") -> Path:
    extra = ["--bits", "2048"] if key_type == "rsa" else []
    _certtool("--generate-privkey", "--key-type", key_type, *extra, "--outfile", str(path),
              cwd=path.parent)  # fmt: skip
    return path


def _self_signed(work: Path, template: str) -> tuple[Path, Path]:
    key = _key(work / "flawed-ca-key.pem")
    (work / "ca.tmpl").write_text(template)
    cert = work / "flawed-ca-cert.pem"
    _certtool("--generate-self-signed", "--load-privkey", str(key),
              "--template", str(work / "ca.tmpl"), "--outfile", str(cert), cwd=work)  # fmt: skip
    return cert, key


def _sign(work: Path, ca: tuple[Path, Path], template: str, key: Path) -> Path:
    (work / "server.tmpl").write_text(template)
    cert = work / "server-cert.pem"
    _certtool("--generate-certificate", "--load-privkey", str(key),
              "--load-ca-certificate", str(ca[0]), "--load-ca-privkey", str(ca[1]),
              "--template", str(work / "server.tmpl"), "--outfile", str(cert),
              cwd=work)  # fmt: skip
    return cert


# flaw -> (the file the check must name, words of the problem it must state)
FLAWS: dict[str, tuple[str, str]] = {
    "ecdsa-key-without-key-encipherment": ("server-cert.pem", "key encipherment"),
    "rsa-without-key-encipherment": ("server-cert.pem", "key encipherment"),
    "without-digital-signature": ("server-cert.pem", "digital signature"),
    "expired": ("server-cert.pem", "expired on"),
    "not-yet-valid": ("server-cert.pem", "not valid before"),
    "server-is-a-ca": ("server-cert.pem", "is a CA certificate"),
    "signed-by-another-ca": ("server-cert.pem", "not issued by the CA"),
    "key-of-another-certificate": ("server-key.pem", "does not match"),
    "ca-not-marked-ca": ("ca-cert.pem", "not marked as a CA"),
    "ca-cannot-sign": ("ca-cert.pem", "does not permit certificate signing"),
    "ca-expired": ("ca-cert.pem", "expired on"),
}


def make_flawed(root: Path, pki: Pki, flaw: str) -> Path:
    """A server directory that is complete and well-formed but has ``flaw``."""
    if flaw not in FLAWS:
        raise KeyError(flaw)
    out = root / flaw
    out.mkdir(parents=True)
    ca = (pki.ca / "ca-cert.pem", pki.ca / "ca-key.pem")
    template = GOOD_SERVER
    key_type = "rsa"
    if flaw.startswith("ca-"):
        ca_template = {
            "ca-not-marked-ca": _without(GOOD_CA, "ca"),
            "ca-cannot-sign": _without(GOOD_CA, "cert_signing_key", "crl_signing_key")
            + "signing_key\n",
            "ca-expired": _without(GOOD_CA, "expiration_days = 2") + PAST,
        }[flaw]
        ca = _self_signed(out, ca_template)
    elif flaw == "signed-by-another-ca":
        ca = _self_signed(out, GOOD_CA)
    elif flaw == "ecdsa-key-without-key-encipherment":
        key_type = "ecdsa"  # certtool's encryption_key does not apply to ECDSA keys
    elif flaw == "rsa-without-key-encipherment":
        template = _without(GOOD_SERVER, "encryption_key")
    elif flaw == "without-digital-signature":
        template = _without(GOOD_SERVER, "signing_key")
    elif flaw == "expired":
        template = _without(GOOD_SERVER, "expiration_days = 2") + PAST
    elif flaw == "not-yet-valid":
        template = _without(GOOD_SERVER, "expiration_days = 2") + FUTURE
    elif flaw == "server-is-a-ca":
        template = GOOD_SERVER + "ca\ncert_signing_key\n"
    key = _key(out / "server-key.pem", key_type)
    _sign(out, ca, template, key)
    shutil.copy(pki.ca / "ca-cert.pem", out / "ca-cert.pem")
    if flaw.startswith("ca-"):
        shutil.copy(ca[0], out / "ca-cert.pem")
    if flaw == "key-of-another-certificate":
        shutil.copy(pki.client / "client-key.pem", out / "server-key.pem")
    for leftover in out.glob("*.tmpl"):
        leftover.unlink()
    for leftover in out.glob("flawed-ca-*"):
        leftover.unlink()
    return out
