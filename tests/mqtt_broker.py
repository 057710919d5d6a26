"""A real MQTT broker for the bridge tests: Debian's mosquitto (installed by
scripts/bootstrap.sh --with-browser), on a free loopback port, with persistence so a
subscriber's QoS 1 session and its queued messages survive a broker restart (SIGTERM writes
the store; ``restart`` starts it again on the same port)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
                                              if Path(p).is_file()), None)


class Mosquitto:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = Path(home), port
        self.binary = mosquitto_binary()
        if self.binary is None:
            raise RuntimeError("mosquitto is not installed: run scripts/bootstrap.sh --with-browser")
        self.conf = self.home / "mosquitto.conf"
        self.log = self.home / "mosquitto.log"
        self.home.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.home}/\nautosave_interval 1\nlog_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {err[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
