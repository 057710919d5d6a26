"""Name why a secured Kafka connection is refused, at once, before a client is built.

Why: kafka-python treats a TLS or SASL failure like an unreachable broker -- it reconnects with
backoff until its bootstrap timeout and then says only "Unable to bootstrap". A plant engineer
with a wrong CA file, a wrong password or a certificate for another host must instead get one
line naming the cause, without waiting and without a stream of reconnects. So every client of
a secured cluster first makes *one* connection itself, with the same settings kafka-python
will use: TCP, then the TLS handshake with the same CA and hostname check, then the SASL
handshake and login (kafka-python's own SCRAM code). Any refusal raises ``AccessDenied``; a
broker that does not answer at all is left to the caller's bounded wait (a broker restarting
under a running service is not an access problem). Measured: docs/results/security.md.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from linewatch.errors import UserError
from linewatch.settings import KafkaSettings

_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
_IP_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH


class AccessDenied(UserError):
    """The broker (or the client's own TLS check) refused the connection; the message names
    the cause and the setting to fix."""


def ssl_context(ks: KafkaSettings) -> ssl.SSLContext:
    """The TLS context kafka-python builds from the same settings: the CA file (else the
    system CAs), the optional client certificate, hostname verification as configured."""
    ctx = ssl.create_default_context(cafile=str(ks.ssl_cafile) if ks.ssl_cafile else None)
    ctx.check_hostname = ks.ssl_check_hostname
    if ks.ssl_certfile:
        password = ks.ssl_password.get_secret_value() if ks.ssl_password else None
        ctx.load_cert_chain(str(ks.ssl_certfile), str(ks.ssl_keyfile) if ks.ssl_keyfile else None, password)
    return ctx


def _servers(ks: KafkaSettings) -> list[tuple[str, int]]:
    out = []
    for item in ks.bootstrap_servers.split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


def _tls_refusal(exc: ssl.SSLError, host: str, where: str, ks: KafkaSettings) -> AccessDenied:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = (exc.verify_message or str(exc)).rstrip(".")
        if exc.verify_code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
            return AccessDenied(
                f"TLS: the broker certificate at {where} is not valid for {host!r} ({why}); connect by a name "
                "the certificate lists (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS) or have the broker certificate reissued")
        ca = f"the CA file {ks.ssl_cafile}" if ks.ssl_cafile else "the system CAs (no LINEWATCH_KAFKA__SSL_CAFILE set)"
        return AccessDenied(
            f"TLS: the broker certificate at {where} is not trusted by {ca} ({why}); "
            "set LINEWATCH_KAFKA__SSL_CAFILE to the CA that signed it")
    reason = getattr(exc, "reason", None) or str(exc)
    hint = "; is it a TLS listener?" if "WRONG_VERSION_NUMBER" in str(exc) else ""
    return AccessDenied(f"TLS handshake with {where} failed ({reason}){hint}")


def _exchange(sock: socket.socket, parser, request):
    parser.send_request(request)
    sock.sendall(parser.send_bytes())
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the broker closed the connection")
        answers = parser.receive_bytes(data)
        if answers:
            return answers[0][1]


def _sasl_login(sock: socket.socket, ks: KafkaSettings, where: str) -> None:
    from kafka.net.sasl import get_sasl_mechanism
    from kafka.protocol.parser import KafkaProtocol
    from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

    mechanism_name = ks.sasl_mechanism or "PLAIN"
    user = ks.sasl_plain_username
    if mechanism_name in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        if not user:
            raise AccessDenied(f"SASL {mechanism_name}: no user name set (LINEWATCH_KAFKA__SASL_PLAIN_USERNAME)")
        if ks.sasl_password() is None:
            raise AccessDenied(f"SASL {mechanism_name} user {user!r}: no password set "
                               "(LINEWATCH_KAFKA__SASL_PASSWORD_FILE or LINEWATCH_KAFKA__SASL_PLAIN_PASSWORD)")
    else:  # GSSAPI / OAUTHBEARER: kafka-python's own login checks them
        return
    parser = KafkaProtocol(client_id=ks.client_id)
    answer = _exchange(sock, parser, SaslHandshakeRequest(mechanism=mechanism_name, version=1))
    if mechanism_name not in (answer.mechanisms or []):
        raise AccessDenied(f"SASL: the broker at {where} does not offer {mechanism_name} "
                           f"(it offers {', '.join(answer.mechanisms or []) or 'none'}; LINEWATCH_KAFKA__SASL_MECHANISM)")
    cfg = ks.client_config()
    mechanism = get_sasl_mechanism(mechanism_name)(host=_servers(ks)[0][0], **cfg)
    while not mechanism.is_done():
        try:
            answer = _exchange(sock, parser, SaslAuthenticateRequest(auth_bytes=mechanism.auth_bytes(), version=1))
        except ConnectionError:
            answer = None
        if answer is None or answer.error_code:
            said = (answer.error_message if answer is not None else None) or "connection closed"
            raise AccessDenied(
                f"SASL {mechanism_name} login as {user!r} refused by the broker at {where}: {said.rstrip('.')} "
                "(a wrong password and an unknown user look alike; check LINEWATCH_KAFKA__SASL_PLAIN_USERNAME "
                "and the password)")
        mechanism.receive(answer.auth_bytes)


def check_access(ks: KafkaSettings, timeout_s: float = 5.0) -> bool:
    """One connection to the first bootstrap server that accepts TCP: TLS handshake (as
    kafka-python will verify it) and SASL login. Raises AccessDenied naming the cause.
    Returns False when no server accepted TCP (the caller's bounded wait reports that), True
    when access was proven; PLAINTEXT: nothing to prove, True."""
    if ks.security_protocol == "PLAINTEXT":
        return True
    for host, port in _servers(ks):
        where = f"{host}:{port}"
        try:
            raw = socket.create_connection((host, port), timeout=timeout_s)
        except OSError:
            continue
        sock: socket.socket = raw
        try:
            raw.settimeout(timeout_s)
            if ks.security_protocol.endswith("SSL"):
                try:
                    sock = ssl_context(ks).wrap_socket(raw, server_hostname=host)
                except ssl.SSLError as exc:
                    raise _tls_refusal(exc, host, where, ks) from None
                except FileNotFoundError as exc:
                    raise AccessDenied(f"TLS: {Path(exc.filename or '?')}: no such file (LINEWATCH_KAFKA__SSL_*)") from None
            if ks.security_protocol.startswith("SASL"):
                try:
                    _sasl_login(sock, ks, where)
                except (TimeoutError, socket.timeout):
                    raise AccessDenied(f"SASL login at {where}: no answer within {timeout_s:g}s") from None
            return True
        except (ConnectionError, TimeoutError, socket.timeout):
            continue  # the broker went away mid-check: not an access problem
        finally:
            sock.close()  # the TLS socket took over raw's descriptor
            raw.close()
    return False
