"""Git and DVC remote operations for the nightly flow (subprocess: the same commands a person types)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lensmith.errors import LensmithError
from lensmith.fsutil import write_json_atomic
from tasks.dvc_runner import dvc_command, tool_env


class RemoteError(LensmithError):
    """The DVC remote (S3) could not be reached or refused the operation."""


@dataclass(frozen=True)
class RemoteResult:
    ran: bool
    detail: str
    failed: bool = False  # the remote refused or could not be reached (after retries)


def default_remote(root: Path) -> str | None:
    proc = dvc_command(root, "remote", "default")
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def dvc_transfer(root: Path, verb: str, *targets: str, timeout_s: float = 3600) -> RemoteResult:
    """`dvc push` / `dvc pull` against the default remote; a clear RemoteError when it fails."""
    remote = default_remote(root)
    if remote is None:
        return RemoteResult(False, "no default DVC remote configured; skipped")
    proc = dvc_command(root, verb, "--remote", remote, *targets, timeout_s=timeout_s)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        if verb == "pull" and "missing" in output.lower() and "unexpected error" not in output.lower():
            return RemoteResult(True, "pulled what the remote has (some outputs not pushed yet): " + _last(output))
        raise RemoteError(f"dvc {verb} to remote {remote!r} failed: {_last(output, 6)}")
    return RemoteResult(True, _last(output))


def checkout_local(root: Path) -> RemoteResult:
    """`dvc checkout`: what a pull does after fetching, from the local cache only (the remote is down).
    RemoteError naming the outputs when the cache lacks some of them."""
    proc = dvc_command(root, "checkout")
    if proc.returncode != 0:
        raise RemoteError(f"the local DVC cache cannot restore every output either: {_last((proc.stdout + proc.stderr).strip(), 6)}")
    return RemoteResult(True, "restored from the local DVC cache")


# A push that failed is remembered here (not versioned) so the next run pushes before anything else.
PENDING_PUSH = Path(".lensmith") / "push-pending.json"


def mark_push_pending(root: Path, reason: str) -> Path:
    path = root / PENDING_PUSH
    since = (read_push_pending(root) or {}).get("since") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(path, {"since": since, "reason": reason[-1000:]})
    return path


def read_push_pending(root: Path) -> dict[str, str] | None:
    """The pending push's record ({since, reason}), or None when every run so far was pushed."""
    path = root / PENDING_PUSH
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    return record if isinstance(record, dict) else {}


def clear_push_pending(root: Path) -> None:
    (root / PENDING_PUSH).unlink(missing_ok=True)


def dvc_status_clean(root: Path) -> bool:
    """True when every stage of dvc.yaml is up to date (nothing for `dvc repro` to do)."""
    proc = dvc_command(root, "status", "--json")
    return proc.returncode == 0 and proc.stdout.strip() in ("{}", "")


def git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, env=tool_env(), capture_output=True, text=True, check=False)


def git_commit_run(root: Path, paths: list[str], message: str, tag: str | None) -> str | None:
    """Commit the run's record (dvc.lock, params, metrics, registry pointers); return the commit sha."""
    existing = [p for p in paths if (root / p).exists()]
    if not existing:
        return None
    add = git(root, "add", "--", *existing)
    if add.returncode != 0:
        raise LensmithError(f"git add failed: {add.stderr.strip()}")
    if git(root, "diff", "--cached", "--quiet").returncode == 0 and tag is None:
        return git(root, "rev-parse", "HEAD").stdout.strip() or None
    commit = git(root, "-c", "user.name=lensmith-nightly", "-c", "user.email=nightly@lensmith.local",
                 "commit", "--allow-empty", "-m", message)
    if commit.returncode != 0:
        raise LensmithError(f"git commit failed: {commit.stderr.strip() or commit.stdout.strip()}")
    sha = git(root, "rev-parse", "HEAD").stdout.strip()
    if tag:
        tagged = git(root, "tag", "-f", tag, sha)
        if tagged.returncode != 0:
            raise LensmithError(f"git tag failed: {tagged.stderr.strip()}")
    return sha


def _last(text: str, lines: int = 2) -> str:
    return " | ".join(text.splitlines()[-lines:])
