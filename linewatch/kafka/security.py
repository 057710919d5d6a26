"""The secrets of the local secured broker (``linewatch broker start --secured``): a local CA,
the broker's certificate, and one SCRAM-SHA-512 user per linewatch role.

Why generated here: a plant's cluster comes with its own CA and users (docs/security.md says
how to point linewatch at it); the local broker must prove the same path -- TLS with hostname
verification, SCRAM over it, least-privilege ACLs -- without anyone running openssl by hand.

Layout under ``<broker home>/security`` (the directory 0700, every secret 0600)::

    ca.pem              the CA certificate clients trust (LINEWATCH_KAFKA__SSL_CAFILE); public
    ca.key              the CA's private key (reissues the broker certificate)
    broker.p12          the broker's key + certificate (+ CA) as a PKCS12 keystore
    broker.p12.password its keystore password
    users.json          {role: Kafka user} the storage was formatted with
    <role>.password     the SCRAM password of each role's user (producer, worker, sink, dashboard,
                        bridge, admin, and ``broker``: the broker's own super user)
    <role>.env          LINEWATCH_KAFKA__* lines that point a service at this broker as that role
                        (the password by file, never inline)

The broker certificate names exactly ``broker.host`` (an IP SAN for an address, a DNS SAN for a
name): a client that connects by another name fails hostname verification, as it should. Its
extended key usage includes clientAuth because the broker also presents it to its own KRaft
controller listener (mutual TLS: no other process can reach the controller).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from linewatch.errors import UserError

ROLES = ("producer", "worker", "sink", "dashboard", "bridge", "admin")
# the broker's own user: inter-broker login, the controller's mTLS principal, the only super user;
# `linewatch broker acls` on the local broker runs as it (no linewatch service ever does)
BROKER_ROLE = "broker"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
BROKER_CN = "linewatch-broker"
CA_CN = "linewatch local CA"
CA_DAYS = 3650
CERT_DAYS = 825
RENEW_DAYS = 30  # a broker certificate this close to expiry is reissued at start


class SecurityError(UserError):
    """The broker's secrets could not be made or read (one-line reason)."""


def default_users() -> dict[str, str]:
    """``{role: Kafka user}`` of the local secured broker: ``linewatch-<role>`` for every role,
    and the broker's own user (its name is the broker certificate's CN, see the module doc)."""
    return {**{role: f"linewatch-{role}" for role in ROLES}, BROKER_ROLE: BROKER_CN}


def _write_secret(path: Path, data: bytes | str) -> None:
    """Write ``path`` readable by its owner only (0600), created so from the start: the secret
    never exists with wider permissions, even for a moment."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, raw)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_secret_file(path: Path) -> str:
    """A secret kept in a file (first line, surrounding whitespace stripped); SecurityError
    naming the file when it cannot be read or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read the secret file ({exc.strerror or exc})") from None
    if not text:
        raise SecurityError(f"{path}: the secret file is empty")
    return text.splitlines()[0].strip()


def scram_credential(password: str, mechanism: str = SCRAM_MECHANISM, iterations: int = SCRAM_ITERATIONS,
                     salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, SaltedPassword) of RFC 5802 for ``password``: what the broker stores, so the
    format command carries no clear-text password."""
    algo = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}[mechanism]
    salt = salt if salt is not None else secrets.token_bytes(32)
    return salt, hashlib.pbkdf2_hmac(algo, password.encode("utf-8"), salt, iterations)


def scram_format_arg(user: str, password: str, mechanism: str = SCRAM_MECHANISM,
                     iterations: int = SCRAM_ITERATIONS) -> str:
    """One ``kafka-storage format --add-scram`` value for ``user`` (salted, not clear text)."""
    if any(c in user for c in ',=[]"'):
        raise SecurityError(f"Kafka user name {user!r} may not contain , = [ ] or \"")
    salt, salted = scram_credential(password, mechanism, iterations)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f'{mechanism}=[name={user},iterations={iterations},salt="{b64(salt)}",saltedpassword="{b64(salted)}"]'


@dataclass(frozen=True)
class BrokerSecrets:
    """Paths of one broker's secrets (``BrokerSecrets.ensure`` makes whatever is missing)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def keystore(self) -> Path:
        return self.root / "broker.p12"

    @property
    def keystore_password_file(self) -> Path:
        return self.root / "broker.p12.password"

    @property
    def users_file(self) -> Path:
        return self.root / "users.json"

    def password_file(self, role: str) -> Path:
        return self.root / f"{role}.password"

    def env_file(self, role: str) -> Path:
        return self.root / f"{role}.env"

    def exists(self) -> bool:
        return self.users_file.is_file()

    def keystore_password(self) -> str:
        return read_secret_file(self.keystore_password_file)

    def password(self, role: str) -> str:
        return read_secret_file(self.password_file(role))

    def users(self) -> dict[str, str]:
        """``{role: Kafka user name}`` the broker was formatted with."""
        try:
            return dict(json.loads(self.users_file.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise SecurityError(f"{self.users_file}: cannot read the broker's users ({exc})") from None

    # ---- making them ------------------------------------------------------------------
    def ensure(self, host: str, users: dict[str, str]) -> list[str]:
        """Create the CA, the broker keystore and the role passwords where missing, and reissue
        the broker certificate when it names another host or expires within RENEW_DAYS.
        Returns what it made (for the start message). Users are fixed at the first call: the
        storage is formatted with them."""
        made: list[str] = []
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not (self.ca_cert.is_file() and self.ca_key.is_file()):
            self._make_ca()
            made.append("CA")
        if self._broker_cert_stale(host):
            self._make_broker_cert(host)
            made.append(f"broker certificate for {host}")
        if self.exists():
            known = self.users()
            if known != users:
                raise SecurityError(
                    f"{self.root}: the broker was formatted with users {known}, settings now name {users}; "
                    "use a new broker home (--home) or the old user names")
        else:
            for role in users:
                if not self.password_file(role).is_file():
                    _write_secret(self.password_file(role), secrets.token_urlsafe(24) + "\n")
            _write_secret(self.users_file, json.dumps(users, indent=2) + "\n")
            made.append(f"{len(users)} SCRAM users")
        return made

    def _make_ca(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_secret(self.ca_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
        _write_public(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
        for stale in (self.keystore, self.keystore_password_file):  # signed by a CA that is gone
            stale.unlink(missing_ok=True)

    def _load_ca(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        return cert, key

    def _broker_cert_stale(self, host: str) -> bool:
        from cryptography.hazmat.primitives.serialization import pkcs12

        if not (self.keystore.is_file() and self.keystore_password_file.is_file()):
            return True
        try:
            bundle = pkcs12.load_pkcs12(self.keystore.read_bytes(), self.keystore_password().encode())
            cert = bundle.cert.certificate
            ca, _ = self._load_ca()
            cert.verify_directly_issued_by(ca)
        except Exception:  # unreadable, or issued by another CA: make a new one
            return True
        left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
        return left < dt.timedelta(days=RENEW_DAYS) or _san_names(cert) != {host}

    def _make_broker_cert(self, host: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_cert, ca_key = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BROKER_CN)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        password = secrets.token_urlsafe(24)
        p12 = pkcs12.serialize_key_and_certificates(BROKER_CN.encode(), key, cert, [ca_cert],
                                                    BestAvailableEncryption(password.encode()))
        _write_secret(self.keystore_password_file, password + "\n")
        _write_secret(self.keystore, p12)

    # ---- what clients need --------------------------------------------------------------
    def write_env_files(self, bootstrap_servers: str) -> dict[str, Path]:
        """One ``<role>.env`` per user: the settings that point a service at this broker as that
        role (``set -a; . worker.env; set +a`` before ``linewatch work``)."""
        out = {}
        for role, user in self.users().items():
            lines = [
                f"# linewatch as the {role} role on the local secured broker (written by `linewatch broker start --secured`)",
                f"LINEWATCH_KAFKA__BOOTSTRAP_SERVERS={bootstrap_servers}",
                "LINEWATCH_KAFKA__SECURITY_PROTOCOL=SASL_SSL",
                f"LINEWATCH_KAFKA__SASL_MECHANISM={SCRAM_MECHANISM}",
                f"LINEWATCH_KAFKA__SASL_PLAIN_USERNAME={user}",
                f"LINEWATCH_KAFKA__SASL_PASSWORD_FILE={self.password_file(role)}",
                f"LINEWATCH_KAFKA__SSL_CAFILE={self.ca_cert}",
            ]
            _write_secret(self.env_file(role), "\n".join(lines) + "\n")
            out[role] = self.env_file(role)
        return out


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _san_names(cert) -> set[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
