"""Who may create an account from the web page: the admin's sign-up policy.

Kept as a small JSON file in the data dir (``web-signup.json``), written atomically, read on each
request: there is no table for site options, and the policy changes rarely. Closed by default.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

FILENAME = "web-signup.json"


@dataclass(frozen=True, kw_only=True)
class SignupPolicy:
    registration_open: bool = False  # anyone who reaches the page may create a (non-admin) account
    signup_credits: int = 0          # credits a new self-registered account starts with


def load(data_dir: Path) -> SignupPolicy:
    try:
        data = json.loads((Path(data_dir) / FILENAME).read_text())
    except FileNotFoundError:
        return SignupPolicy()
    except (OSError, ValueError):
        return SignupPolicy()  # unreadable: closed, the safe answer
    if not isinstance(data, dict):
        return SignupPolicy()
    return SignupPolicy(registration_open=data.get("registration_open") is True,
                        signup_credits=max(0, int(data.get("signup_credits") or 0)))


def save(data_dir: Path, policy: SignupPolicy) -> None:
    path = Path(data_dir) / FILENAME
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{FILENAME}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(policy), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
