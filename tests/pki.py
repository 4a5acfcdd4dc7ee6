"""Test certificates made with the openssl command line."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(args: str, cwd: Path) -> None:
    """Run openssl; args are split on spaces (every file name here is relative to cwd)."""
    subprocess.run(["openssl", *args.split()], cwd=cwd, check=True, capture_output=True, timeout=60)


EC_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def make_ca(d: Path, name: str) -> None:
    openssl(f"req -x509 {EC_KEY} -keyout {name}.key -out {name}.crt -days 1 -subj /CN={name}", d)


def make_cert(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext + "\n")
    openssl(f"req {EC_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}", d)
    openssl(
        f"x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial "
        f"-out {name}.crt -days 1 -extfile {name}.ext",
        d,
    )


def agent_pki(d: Path, names_and_ips: dict[str, list[str]]) -> Path:
    """A CA, a rogue CA, and for each agent a cert usable as server and client."""
    d.mkdir(parents=True, exist_ok=True)
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    for name, ips in names_and_ips.items():
        san = ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"])
        make_cert(d, name, "ca", f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth")
    make_cert(
        d,
        "rogue",
        "other-ca",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
    )
    return d
