"""Corral's own SSH identity, and host-key fingerprints."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def ensure_keypair(path: Path) -> tuple[Path, str]:
    """The private key file (created mode 600 on first use) and its public line."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
        path.with_suffix(".pub").write_text(public.decode() + " corral\n")
        os.replace(tmp, path)
    return path, path.with_suffix(".pub").read_text().strip()


def fingerprint(key_type: str, key_b64: str) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a public key blob."""
    digest = hashlib.sha256(base64.b64decode(key_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
