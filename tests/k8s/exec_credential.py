"""A kubeconfig exec credential plugin for the emulated cluster, like `aws eks get-token` or
`gke-gcloud-auth-plugin`: prints an ExecCredential (client.authentication.k8s.io/v1) holding a short-lived token.

The token is `emu-v1.<expiry ms>.<nonce>.<HMAC-SHA256 of "<expiry ms>.<nonce>" under the cluster's key>`: the
emulator accepts only tokens signed with its key (so only ones this plugin issued for it) and only until their expiry,
as EKS accepts a presigned STS request only for its short validity. Standard library only, started per credential.

    python exec_credential.py --key-file K --lifetime SECONDS [--no-expiration-timestamp] [--log FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import sys
import time


def sign(key: bytes, expiry_ms: int, nonce: str) -> str:
    payload = f"{expiry_ms}.{nonce}"
    return f"emu-v1.{payload}.{hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()}"


def verify(key: bytes, token: str, now: float | None = None) -> str:
    """"ok", "expired" or "invalid" (not signed with this key, or malformed)."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != "emu-v1" or not parts[1].isdigit():
        return "invalid"
    if not hmac.compare_digest(sign(key, int(parts[1]), parts[2]), token):
        return "invalid"
    return "ok" if int(parts[1]) / 1000 > (time.time() if now is None else now) else "expired"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--lifetime", type=float, required=True)
    # Some plugins give no expirationTimestamp; a client then learns of the expiry only from a 401.
    parser.add_argument("--no-expiration-timestamp", action="store_true")
    parser.add_argument("--log", help="append one line per issued token (its expiry), for tests to count")
    args = parser.parse_args(argv)
    with open(args.key_file, "rb") as f:
        key = f.read()
    expiry_ms = int((time.time() + args.lifetime) * 1000)
    status = {"token": sign(key, expiry_ms, os.urandom(8).hex())}
    if not args.no_expiration_timestamp:
        # Whole seconds, rounded down: the client believes it expires no later than it does.
        status["expirationTimestamp"] = dt.datetime.fromtimestamp(expiry_ms // 1000, dt.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
    if args.log:
        with open(args.log, "a") as f:
            f.write(f"{expiry_ms}\n")
    json.dump({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status},
              sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
